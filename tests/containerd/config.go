package containerd

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"text/template"

	"golang.org/x/sys/unix"
)

// configTemplate is the private containerd's config.toml (version 2, the
// format of containerd 1.6). Everything that containerd would keep in a
// global place lives under the host's directory, so that hosts of several
// test binaries run side by side and leave nothing behind:
//
//   - root, state, the gRPC socket, the opt plugin's path;
//   - runc's state (runtimes.runc.options.Root; the default is shared
//     /run/containerd/runc);
//   - pod network namespaces (netns_mounts_under_state_dir; the default is
//     the shared /var/run/netns);
//   - the CNI conf_dir (bin_dir is Debian's /usr/lib/cni);
//   - the streaming server listens on a random loopback port (the default
//     10010 would collide between hosts).
//
// restrict_oom_score_adj is required here: root lacks CAP_SYS_RESOURCE, and
// without it every RunPodSandbox fails with "can't get final child's PID
// from pipe". The sandbox image is the locally built pause image: the
// default, registry.k8s.io/pause, cannot be pulled.
var configTemplate = template.Must(template.New("config.toml").Funcs(template.FuncMap{"q": strconv.Quote}).Parse(`version = 2
root = {{q .Root}}
state = {{q .State}}
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {{q .Socket}}

[debug]
  level = {{q .LogLevel}}

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {{q .Opt}}

  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = {{q .SandboxImage}}
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    max_container_log_line_size = 16384

    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = {{q .Snapshotter}}
      default_runtime_name = "runc"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"

        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = {{q .RuncRoot}}
          SystemdCgroup = false

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = {{q .CNIBinDir}}
      conf_dir = {{q .CNIConfDir}}
      max_conf_num = 1
`))

type configValues struct {
	Root, State, Socket, Opt, RuncRoot string
	LogLevel                           string
	SandboxImage                       string
	Snapshotter                        string
	CNIBinDir, CNIConfDir              string
}

func writeConfig(path string, v configValues) error {
	var buf bytes.Buffer
	if err := configTemplate.Execute(&buf, v); err != nil {
		return fmt.Errorf("render containerd config: %w", err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("write containerd config: %w", err)
	}
	return nil
}

// overlayWorks mounts and unmounts a small overlay under dir: containerd's
// overlayfs snapshotter needs the kernel's overlay filesystem and a backing
// filesystem that can be an upper layer (not tmpfs without xattrs, not
// another overlay on older kernels). It returns why not.
func overlayWorks(dir string) error {
	base := filepath.Join(dir, "overlay-probe")
	defer os.RemoveAll(base)
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o755); err != nil {
			return fmt.Errorf("prepare overlay probe: %w", err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s",
		filepath.Join(base, "lower"), filepath.Join(base, "upper"), filepath.Join(base, "work"))
	merged := filepath.Join(base, "merged")
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		return fmt.Errorf("mount overlay in %s: %w", dir, err)
	}
	if err := unix.Unmount(merged, 0); err != nil {
		return fmt.Errorf("unmount overlay probe: %w", err)
	}
	return nil
}
