package cri_test

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/cri"
	ctrd "github.com/tetheredge/tether/edgecore/runtime/containerd"
	"github.com/tetheredge/tether/tests/containerd"
)

// counted is a real backend whose id-routed and list calls are counted,
// so a test sees which backend the shim chose. Nothing is faked: every
// call goes on to containerd.
type counted struct {
	cri.Backend
	byID, lists atomic.Int64
}

func (c *counted) PodSandboxStatus(ctx context.Context, id string, verbose bool) (*runtimeapi.PodSandboxStatusResponse, error) {
	c.byID.Add(1)
	return c.Backend.PodSandboxStatus(ctx, id, verbose)
}

func (c *counted) ContainerStatus(ctx context.Context, id string, verbose bool) (*runtimeapi.ContainerStatusResponse, error) {
	c.byID.Add(1)
	return c.Backend.ContainerStatus(ctx, id, verbose)
}

func (c *counted) ListPodSandbox(ctx context.Context, f *runtimeapi.PodSandboxFilter) ([]*runtimeapi.PodSandbox, error) {
	c.lists.Add(1)
	return c.Backend.ListPodSandbox(ctx, f)
}

// vmSlot fills the VM slot with a second connection to the same
// containerd, counted: the only way to exercise the VM handler's routing
// before the VM backend exists.
func vmSlot(t *testing.T, h *containerd.Host) *counted {
	t.Helper()
	b, err := ctrd.New(quiet(context.Background()), ctrd.Config{Endpoint: h.Endpoint()})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, b.Close(context.Background())) })
	return &counted{Backend: handlerless{b}}
}

// handlerless runs sandboxes with containerd's default runtime: the test
// containerd has no "tether-vm" runtime configured.
type handlerless struct{ cri.Backend }

func (h handlerless) RunPodSandbox(ctx context.Context, cfg *runtimeapi.PodSandboxConfig, _ string) (string, error) {
	return h.Backend.RunPodSandbox(ctx, cfg, "")
}

// TestIDMapSurvivesRestart: a sandbox and a container created through the
// VM handler are routed to the VM backend by a new shim on the same SQLite
// file; ids the map does not know go to the default backend; lists fan out
// to both backends and merge.
func TestIDMapSurvivesRestart(t *testing.T) {
	h := containerd.Start(t)
	ctx := quiet(t.Context())
	db := filepath.Join(t.TempDir(), "edge.db")

	vm1 := vmSlot(t, h)
	s1 := startShim(t, h, shimOpts{db: db, vm: vm1})
	sb := h.PodSandboxConfig("vm-pod", true)
	podID, err := s1.Runtime.RunPodSandbox(ctx, sb, "tether-vm")
	require.NoError(t, err)
	ctrID, err := s1.Runtime.CreateContainer(ctx, podID, h.BusyboxContainer("vm-ctr", "sleep", "3600"), sb)
	require.NoError(t, err)
	s1.stop()

	// Restart: a new shim, new backends, the same file.
	vm2 := vmSlot(t, h)
	var def *counted
	s2 := startShim(t, h, shimOpts{db: db, vm: vm2, wrapDef: func(b cri.Backend) cri.Backend { def = &counted{Backend: b}; return def }})
	_, err = s2.Runtime.PodSandboxStatus(ctx, podID, false)
	require.NoError(t, err)
	_, err = s2.Runtime.ContainerStatus(ctx, ctrID, false)
	require.NoError(t, err)
	require.Equal(t, int64(2), vm2.byID.Load(), "the sandbox and the container route to the VM backend after the restart")
	require.Zero(t, def.byID.Load())

	// A sandbox made behind the shim's back belongs to the default backend.
	other, err := h.Runtime.RunPodSandbox(ctx, h.PodSandboxConfig("behind-the-back", true), "")
	require.NoError(t, err)
	_, err = s2.Runtime.PodSandboxStatus(ctx, other, false)
	require.NoError(t, err)
	require.Equal(t, int64(1), def.byID.Load())

	// Lists ask both backends; as both are the same containerd here, each
	// sandbox comes back twice.
	pods, err := s2.Runtime.ListPodSandbox(ctx, nil)
	require.NoError(t, err)
	require.Len(t, pods, 4)
	require.Equal(t, int64(1), def.lists.Load())
	require.Equal(t, int64(1), vm2.lists.Load())

	// Removing the sandbox forgets it and its container.
	require.NoError(t, s2.Runtime.RemovePodSandbox(ctx, podID))
	_, err = s2.Runtime.ContainerStatus(ctx, ctrID, false)
	require.Equal(t, codes.NotFound, status.Code(err), "%v", err)
	require.Equal(t, int64(2), def.byID.Load(), "a forgotten container id falls back to the default backend")
}

// TestDeadlines: every call is bounded by the configured timeout, plus
// its own for ExecSync and StopContainer (a grace period longer than the
// bound still ends in SIGKILL, not DeadlineExceeded: a pod that ignores
// SIGTERM could otherwise never be stopped through the shim), and a
// shorter deadline of the caller is kept.
func TestDeadlines(t *testing.T) {
	h := containerd.Start(t)
	s := startShim(t, h, shimOpts{cfg: cri.Config{CallTimeout: 700 * time.Millisecond}})
	ctx := quiet(t.Context())
	sb := h.PodSandboxConfig("slow", true)
	// The sandbox and container are made straight on containerd (ids the
	// shim does not know go to its default backend): under load, creating
	// them can take longer than the 700 ms bound under test.
	podID, err := h.Runtime.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	// sleep as PID 1 of its PID namespace ignores SIGTERM: StopContainer
	// waits its timeout before SIGKILL.
	c := h.BusyboxContainer("slow", "sleep", "3600")
	c.Linux = &runtimeapi.LinuxContainerConfig{SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
		NamespaceOptions: &runtimeapi.NamespaceOption{Pid: runtimeapi.NamespaceMode_CONTAINER},
	}}
	ctrID, err := h.Runtime.CreateContainer(ctx, podID, c, sb)
	require.NoError(t, err)
	require.NoError(t, h.Runtime.StartContainer(ctx, ctrID))

	t0 := time.Now()
	_, err = s.Raw.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: ctrID, Cmd: []string{"sleep", "30"}})
	require.Equal(t, codes.DeadlineExceeded, status.Code(err), "%v", err)
	require.Less(t, time.Since(t0), 10*time.Second, "an exec without a timeout of its own: the shim's 700 ms bound, not the 30 s sleep")

	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	t0 = time.Now()
	_, err = s.Raw.ExecSync(short, &runtimeapi.ExecSyncRequest{ContainerId: ctrID, Cmd: []string{"sleep", "30"}, Timeout: 30})
	require.Equal(t, codes.DeadlineExceeded, status.Code(err), "%v", err)
	require.Less(t, time.Since(t0), 10*time.Second, "the caller's 200 ms, not ExecSync's 30 s")

	// A shim whose bound (3 s) is shorter than the stop's 5 s grace period;
	// the margin beyond the grace period is the bound.
	s3 := startShim(t, h, shimOpts{cfg: cri.Config{CallTimeout: 3 * time.Second}})
	t0 = time.Now()
	_, err = s3.Raw.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: ctrID, Timeout: 5})
	require.NoError(t, err, "a stop timeout longer than the shim's bound is the container's grace period")
	require.GreaterOrEqual(t, time.Since(t0), 5*time.Second, "SIGTERM was ignored: the container ran until its grace period ended")
	st, err := h.Runtime.ContainerStatus(ctx, ctrID, false)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, st.GetStatus().GetState())
}
