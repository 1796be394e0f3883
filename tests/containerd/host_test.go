package containerd_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/tests/containerd"
)

// sandboxConfig is a minimal pod: host network unless hostNet is false.
func sandboxConfig(name, logDir string, hostNet bool) *runtimeapi.PodSandboxConfig {
	// As kubelet does: a host-network pod keeps the node's UTS namespace,
	// so it gets no hostname of its own (runc refuses one).
	mode, hostname := runtimeapi.NamespaceMode_POD, name
	if hostNet {
		mode, hostname = runtimeapi.NamespaceMode_NODE, ""
	}
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "default", Uid: "uid-" + name},
		Hostname:     hostname,
		LogDirectory: logDir,
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{Network: mode},
			},
		},
	}
}

func busybox(h *containerd.Host, name string, cmd ...string) *runtimeapi.ContainerConfig {
	return &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: name},
		Image:    &runtimeapi.ImageSpec{Image: h.BusyboxImage},
		Command:  cmd,
		LogPath:  name + ".log",
	}
}

// runPod runs a sandbox and one started container in it.
func runPod(ctx context.Context, t *testing.T, h *containerd.Host, sb *runtimeapi.PodSandboxConfig, c *runtimeapi.ContainerConfig) (string, string) {
	t.Helper()
	podID, err := h.Runtime.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	ctrID, err := h.Runtime.CreateContainer(ctx, podID, c, sb)
	require.NoError(t, err)
	require.NoError(t, h.Runtime.StartContainer(ctx, ctrID))
	return podID, ctrID
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// A host-network pod runs busybox, which echoes to its log; the log is read
// from the path the CRI reports, in the CRI log format.
func TestHostNetworkPodLogs(t *testing.T) {
	h := containerd.Start(t)
	ctx := testContext(t)

	sb := sandboxConfig("echo", h.PodLogDir("echo"), true)
	_, ctrID := runPod(ctx, t, h, sb, busybox(h, "echo", "sh", "-c", "echo hello from busybox; echo to stderr >&2"))

	var status *runtimeapi.ContainerStatus
	require.Eventually(t, func() bool {
		resp, err := h.Runtime.ContainerStatus(ctx, ctrID, false)
		require.NoError(t, err)
		status = resp.GetStatus()
		return status.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED
	}, time.Minute, 20*time.Millisecond)
	require.Equal(t, int32(0), status.GetExitCode())
	require.NotEmpty(t, status.GetLogPath())

	b, err := os.ReadFile(status.GetLogPath())
	require.NoError(t, err)
	// CRI log lines: RFC 3339 time, stream, P(artial) or F(ull), text.
	var got []string
	for line := range strings.Lines(string(b)) {
		f := strings.SplitN(strings.TrimSuffix(line, "\n"), " ", 4)
		require.Len(t, f, 4, "CRI log line %q", line)
		_, err := time.Parse(time.RFC3339Nano, f[0])
		require.NoError(t, err)
		require.Equal(t, "F", f[2])
		got = append(got, f[1]+": "+f[3])
	}
	require.ElementsMatch(t, []string{"stdout: hello from busybox", "stderr: to stderr"}, got)
}
