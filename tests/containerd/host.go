// Package containerd runs a private containerd for tests: the real-parts
// runtime host that every Tether runtime test and benchmark starts from.
//
// Start writes a config.toml (see config.go), starts Debian's containerd
// with its root, state, socket, runc state, network namespaces and CNI
// configuration all in one temporary directory, waits until its CRI answers
// Version, imports the locally built pause and busybox images (build/images)
// with `ctr images import`, and connects the k8s.io/cri-client runtime and
// image clients. Test cleanup (or Stop) removes every pod sandbox and
// container, stops containerd, then checks that no process, mount or network
// namespace of this host is left; leftovers are removed and reported as an
// error, so a test that leaks fails. What a killed test binary left behind
// is reaped by the next Start (stale.go). docs/runtime.md has the details.
//
// Missing binaries or a containerd that does not start fail the test with
// the reason: these tests never skip. `make runtime-deps` installs the
// packages. The package is for tests only: production code must not import
// it.
package containerd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	remote "k8s.io/cri-client/pkg"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/build/images"
	"github.com/tetheredge/tether/edgecore/cri"
)

// CNIBinDir is where Debian's containernetworking-plugins install.
const CNIBinDir = "/usr/lib/cni"

// callTimeout bounds each CRI call of the clients the host hands out.
const callTimeout = time.Minute

// Option changes how Start sets up the host.
type Option func(*options)

type options struct {
	cni      bool
	images   images.Config
	logLevel string
	start    time.Duration
	grace    time.Duration
}

// WithCNI installs build/cni's bridge network (on a bridge and subnet of
// this host's own, see Network) so that sandboxes without host networking
// get a veth and an address. Without it only host-network sandboxes work.
func WithCNI() Option { return func(o *options) { o.cni = true } }

// WithImages sets where the images are built from and cached (the zero
// images.Config is the default).
func WithImages(cfg images.Config) Option { return func(o *options) { o.images = cfg } }

// WithLogLevel sets containerd's log level ("info" by default; "debug"
// explains a failing CRI call in containerd.log).
func WithLogLevel(level string) Option { return func(o *options) { o.logLevel = level } }

// WithStartTimeout bounds the wait for containerd's CRI (30 s by default).
func WithStartTimeout(d time.Duration) Option { return func(o *options) { o.start = d } }

// WithLeakGrace sets how long teardown waits for the host's processes to
// end by themselves (shims exit just after their last task is deleted)
// before it kills them and reports them as leaked: 15 s by default, which
// a loaded machine needs; a test that plants a leak shortens it.
func WithLeakGrace(d time.Duration) Option { return func(o *options) { o.grace = d } }

// Host is a running private containerd. Its fields are set by Start and
// read-only afterwards.
type Host struct {
	// Dir holds everything of this host: config.toml, containerd.log,
	// root/, state/ (with the pods' network namespaces), runc/, cni/.
	Dir string
	// Socket is containerd's gRPC socket; Endpoint gives it as a CRI
	// endpoint.
	Socket string
	// Runtime and Images are CRI clients (k8s.io/cri-client) connected to
	// Socket; each call is bounded by a one-minute timeout.
	Runtime internalapi.RuntimeService
	Images  internalapi.ImageManagerService
	// PauseImage is the sandbox image; BusyboxImage the workload image.
	// Both are imported and present (use imagePullPolicy Never).
	PauseImage, BusyboxImage string
	// Snapshotter is "overlayfs", or "native" where an overlay cannot be
	// mounted in Dir (Start logs why).
	Snapshotter string
	// Network is the CNI network installed by WithCNI, nil without.
	Network *Network

	tb       testing.TB
	grace    time.Duration
	owner    *os.File // flock held for the host's life, see stale.go
	logPath  string
	cmd      *exec.Cmd
	exited   chan struct{}
	stopOnce sync.Once
	stopErr  error
}

// Start starts a private containerd and registers its teardown with
// tb.Cleanup. It fails tb (never skips) when a binary is missing or
// containerd does not come up.
func Start(tb testing.TB, opts ...Option) *Host {
	tb.Helper()
	o := options{logLevel: "info", start: 30 * time.Second, grace: 15 * time.Second}
	for _, opt := range opts {
		opt(&o)
	}
	if uid := os.Geteuid(); uid != 0 {
		tb.Fatalf("containerd host: containerd needs root, running as uid %d", uid)
	}
	need := []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr"}
	if o.cni {
		need = append(need, "ip") // deletes the bridge
	}
	for _, bin := range need {
		if _, err := exec.LookPath(bin); err != nil {
			tb.Fatalf("containerd host: %s not found (run `make runtime-deps`, or apt-get install containerd runc containernetworking-plugins busybox-static iproute2): %v", bin, err)
		}
	}
	if o.cni {
		for _, p := range []string{"bridge", "host-local", "portmap", "loopback"} {
			if _, err := os.Stat(filepath.Join(CNIBinDir, p)); err != nil {
				tb.Fatalf("containerd host: CNI plugin %s missing (apt-get install containernetworking-plugins): %v", p, err)
			}
		}
	}

	ctx, cancel := context.WithTimeout(quiet(), 2*time.Minute)
	defer cancel()
	archives, err := images.All(ctx, o.images)
	if err != nil {
		tb.Fatalf("containerd host: build images: %v", err)
	}

	// Not t.TempDir: the socket path must stay under the 108 bytes of a
	// unix address whatever the test's name, and teardown must unmount
	// before anything is removed.
	for _, r := range reapStale() {
		tb.Logf("containerd host: reaped the host of a killed test binary: %s", r)
	}
	dir, err := os.MkdirTemp("", hostPattern)
	if err != nil {
		tb.Fatalf("containerd host: %v", err)
	}
	owner, err := lockDir(dir)
	if err != nil {
		_ = os.RemoveAll(dir)
		tb.Fatalf("containerd host: %v", err)
	}
	h := &Host{
		Dir:          dir,
		Socket:       filepath.Join(dir, "containerd.sock"),
		PauseImage:   images.PauseRef,
		BusyboxImage: images.BusyboxRef,
		Snapshotter:  "overlayfs",
		tb:           tb,
		logPath:      filepath.Join(dir, "containerd.log"),
		owner:        owner,
		grace:        o.grace,
	}
	tb.Cleanup(func() {
		// A test that called Stop itself has seen its error.
		ran := false
		h.stopOnce.Do(func() { ran, h.stopErr = true, h.stop() })
		if ran && h.stopErr != nil {
			tb.Errorf("containerd host: %v", h.stopErr)
		}
	})
	if err := overlayWorks(dir); err != nil {
		tb.Logf("containerd host: snapshotter native, overlayfs unusable: %v", err)
		h.Snapshotter = "native"
	}
	cniConf := filepath.Join(dir, "cni", "net.d")
	if err := os.MkdirAll(cniConf, 0o755); err != nil {
		tb.Fatalf("containerd host: %v", err)
	}
	if o.cni {
		if h.Network, err = installNetwork(cniConf, filepath.Join(dir, "cni", "ipam")); err != nil {
			tb.Fatalf("containerd host: %v", err)
		}
	}
	cfgPath := filepath.Join(dir, "config.toml")
	err = writeConfig(cfgPath, configValues{
		Root:         filepath.Join(dir, "root"),
		State:        filepath.Join(dir, "state"),
		Socket:       h.Socket,
		Opt:          filepath.Join(dir, "opt"),
		RuncRoot:     h.runcRoot(),
		LogLevel:     o.logLevel,
		SandboxImage: images.PauseRef,
		Snapshotter:  h.Snapshotter,
		CNIBinDir:    CNIBinDir,
		CNIConfDir:   cniConf,
	})
	if err != nil {
		tb.Fatalf("containerd host: %v", err)
	}
	if err := h.start(cfgPath); err != nil {
		tb.Fatalf("containerd host: %v", err)
	}
	if err := h.connect(ctx, o.start); err != nil {
		tb.Fatalf("containerd host: %v\ncontainerd.log:\n%s", err, h.logTail(40))
	}
	for _, a := range archives {
		if err := h.importImage(ctx, a); err != nil {
			tb.Fatalf("containerd host: %v\ncontainerd.log:\n%s", err, h.logTail(40))
		}
	}
	return h
}

// Endpoint is the CRI endpoint of the host (unix://<Socket>), for clients
// of one's own such as the CRI shim's backend.
func (h *Host) Endpoint() string { return "unix://" + h.Socket }

// LogPath is containerd's own log file.
func (h *Host) LogPath() string { return h.logPath }

// PodLogDir returns a fresh directory for a sandbox's LogDirectory (CRI
// container logs), removed with the host.
func (h *Host) PodLogDir(name string) string {
	h.tb.Helper()
	dir, err := os.MkdirTemp(h.Dir, "logs-"+name+"-")
	if err != nil {
		h.tb.Fatalf("containerd host: %v", err)
	}
	return dir
}

func (h *Host) start(cfgPath string) error {
	logFile, err := os.Create(h.logPath)
	if err != nil {
		return fmt.Errorf("create containerd log: %w", err)
	}
	defer logFile.Close() // the child has its own descriptor
	cmd := exec.Command("containerd", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// containerd must not outlive the test binary. (Its shims do when
	// the binary is killed, until the next Start; see stale.go.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start containerd: %w", err)
	}
	h.cmd = cmd
	h.exited = make(chan struct{})
	go func() {
		_ = cmd.Wait() // the exit is read from ProcessState after exited
		close(h.exited)
	}()
	return nil
}

// connect waits until the socket accepts and the CRI answers Version, or
// containerd exits, or timeout passes, then connects the CRI clients.
func (h *Host) connect(ctx context.Context, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var lastErr error
	for {
		select {
		case <-h.exited:
			return fmt.Errorf("containerd exited during start: %s", h.cmd.ProcessState)
		case <-deadline.C:
			return fmt.Errorf("containerd CRI not ready after %s: %w", timeout, lastErr)
		case <-tick.C:
		}
		if _, err := os.Stat(h.Socket); err != nil {
			lastErr = err
			continue
		}
		// cri-client leaks its connection when its own Version check
		// fails, which it does while the CRI plugin is still starting:
		// ask on a connection of our own until the plugin answers.
		if err := h.askVersion(ctx); err != nil {
			lastErr = err
			continue
		}
		rt, err := remote.NewRemoteRuntimeService(ctx, h.Endpoint(), callTimeout, nil, false)
		if err != nil {
			return fmt.Errorf("connect CRI runtime service: %w", err)
		}
		img, err := remote.NewRemoteImageService(ctx, h.Endpoint(), callTimeout, nil, false)
		if err != nil {
			_ = rt.Close(ctx)
			return fmt.Errorf("connect CRI image service: %w", err)
		}
		h.Runtime, h.Images = rt, img
		return nil
	}
}

// askVersion asks the CRI plugin for its version on a connection it
// closes again.
func (h *Host) askVersion(ctx context.Context) error {
	conn, err := grpc.NewClient(h.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect containerd: %w", err)
	}
	return errors.Join(cri.AskVersion(ctx, conn, 5*time.Second), conn.Close())
}

// importImage imports an archive into the CRI's namespace, unpacked for the
// host's snapshotter, and waits until the CRI image service lists it.
func (h *Host) importImage(ctx context.Context, a images.Archive) error {
	cmd := exec.CommandContext(ctx, "ctr", "--address", h.Socket, "-n", "k8s.io",
		"images", "import", "--snapshotter", h.Snapshotter, a.Path)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("import image %s: %w: %s", a.Ref, err, strings.TrimSpace(string(out)))
	}
	// The CRI plugin learns of the import from containerd's image events.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		resp, err := h.Images.ImageStatus(ctx, &runtimeapi.ImageSpec{Image: a.Ref}, false)
		if err != nil {
			return fmt.Errorf("check image %s: %w", a.Ref, err)
		}
		if resp.GetImage() != nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("image %s imported but not seen by the CRI: %w", a.Ref, ctx.Err())
		case <-tick.C:
		}
	}
}

// Stop tears the host down: it removes every sandbox and container through
// the CRI, stops containerd, removes the CNI bridge, and removes Dir. It
// then returns an error naming anything that had to be cleaned up by force
// (processes, mounts, network namespaces left by the orderly teardown), so
// a leak fails the test. Stop is idempotent; test cleanup calls it and
// reports its error unless the test called Stop first.
func (h *Host) Stop() error {
	h.stopOnce.Do(func() { h.stopErr = h.stop() })
	return h.stopErr
}

func (h *Host) stop() error {
	var errs []error
	var owned []proc
	if h.Runtime != nil {
		ctx, cancel := context.WithTimeout(quiet(), 2*time.Minute)
		var err error
		owned, err = h.removeAll(ctx)
		if err != nil {
			errs = append(errs, err)
		}
		errs = append(errs, h.Runtime.Close(ctx), h.Images.Close(ctx))
		cancel()
	}
	if h.cmd != nil {
		errs = append(errs, h.stopContainerd())
	}
	if err := h.reapLeftovers(owned, h.grace); err != nil {
		errs = append(errs, err)
	}
	if h.Network != nil {
		errs = append(errs, h.Network.remove())
	}
	tail := h.logTail(40)
	if err := os.RemoveAll(h.Dir); err != nil {
		errs = append(errs, fmt.Errorf("remove host dir: %w", err))
	}
	_ = h.owner.Close() // after the removal: no reaper may take the dir before
	err := errors.Join(errs...)
	if err != nil || h.tb.Failed() {
		h.tb.Logf("containerd host %s, last lines of containerd.log:\n%s", h.Dir, tail)
	}
	return err
}

// removeAll stops and removes every sandbox and container, and returns the
// processes they ran, so that reapLeftovers can check they are gone.
func (h *Host) removeAll(ctx context.Context) ([]proc, error) {
	var owned []proc
	var errs []error
	containers, err := h.Runtime.ListContainers(ctx, nil)
	if err != nil {
		errs = append(errs, fmt.Errorf("list containers: %w", err))
	}
	for _, c := range containers {
		owned = append(owned, h.containerProc(ctx, c.GetId())...)
	}
	sandboxes, err := h.Runtime.ListPodSandbox(ctx, nil)
	if err != nil {
		errs = append(errs, fmt.Errorf("list sandboxes: %w", err))
	}
	for _, s := range sandboxes {
		owned = append(owned, h.sandboxProc(ctx, s.GetId())...)
		if err := h.Runtime.StopPodSandbox(ctx, s.GetId()); err != nil {
			errs = append(errs, fmt.Errorf("stop sandbox %s: %w", s.GetId(), err))
		}
		if err := h.Runtime.RemovePodSandbox(ctx, s.GetId()); err != nil {
			errs = append(errs, fmt.Errorf("remove sandbox %s: %w", s.GetId(), err))
		}
	}
	// Containers whose sandbox was already gone.
	containers, err = h.Runtime.ListContainers(ctx, nil)
	if err != nil {
		errs = append(errs, fmt.Errorf("list containers: %w", err))
	}
	for _, c := range containers {
		if err := h.Runtime.RemoveContainer(ctx, c.GetId()); err != nil {
			errs = append(errs, fmt.Errorf("remove container %s: %w", c.GetId(), err))
		}
	}
	return owned, errors.Join(errs...)
}

// stopContainerd sends SIGTERM, and SIGKILL after 10 s.
func (h *Host) stopContainerd() error {
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
		return nil
	case <-time.After(10 * time.Second):
	}
	_ = h.cmd.Process.Kill()
	<-h.exited
	return errors.New("containerd did not stop within 10s of SIGTERM, killed")
}

// quiet is a context whose klog logger (cri-client logs through it)
// discards: the host returns or reports every error itself.
func quiet() context.Context { return klog.NewContext(context.Background(), logr.Discard()) }

// logTail returns the last n lines of containerd.log.
func (h *Host) logTail(n int) string { return Tail(h.logPath, n) }

// Tail returns the last n lines of the log file at path, or why it has
// none.
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
