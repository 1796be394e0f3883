package containerd_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/edgecore/cri"
	ctrd "github.com/tetheredge/tether/edgecore/runtime/containerd"
	"github.com/tetheredge/tether/tests/containerd"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestNewLeaksNothingWhenContainerdIsAbsent: New against a socket nobody
// serves fails, naming the endpoint, and leaves no gRPC goroutine behind
// (cri-client's constructors would leak their connection on a failed
// Version; New asks on its own connection first).
func TestNewLeaksNothingWhenContainerdIsAbsent(t *testing.T) {
	before := goleak.IgnoreCurrent()
	sock := filepath.Join(t.TempDir(), "absent.sock")
	for range 3 {
		_, err := ctrd.New(t.Context(), ctrd.Config{Endpoint: "unix://" + sock, Timeout: time.Second})
		require.ErrorContains(t, err, sock)
	}
	goleak.VerifyNone(t, before)
}

// runBackend starts a backend on endpoint with Run in the background; both
// end with the test.
func runBackend(t *testing.T, endpoint string) *ctrd.Backend {
	t.Helper()
	ctx := klog.NewContext(context.Background(), logr.Discard())
	b, err := ctrd.New(ctx, ctrd.Config{Endpoint: endpoint, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- b.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, b.Close(ctx))
	})
	return b
}

// subscribed starts a containerd host and a running backend on it, and
// returns a subscription to its events once the backend has subscribed to
// containerd's.
func subscribed(t *testing.T) (*containerd.Host, *ctrd.Backend, context.Context, <-chan cri.Event) {
	t.Helper()
	h := containerd.Start(t)
	b := runBackend(t, h.Endpoint())
	ctx := klog.NewContext(t.Context(), logr.Discard())
	events := b.Events(ctx)
	select {
	case <-b.OnReconnect():
	case <-time.After(10 * time.Second):
		require.FailNow(t, "never subscribed")
	}
	return h, b, ctx, events
}

// next waits for the next event of id, at most d.
func next(t *testing.T, ch <-chan cri.Event, id string, d time.Duration) cri.Event {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-ch:
			require.True(t, ok, "subscription closed")
			if ev.ContainerID == id {
				return ev
			}
		case <-timer.C:
			require.FailNow(t, "no event", "for %s within %s", id, d)
		}
	}
}

// TestExitEvent: a container that runs sh -c "exit 3" is reported started,
// then exited with code 3 (the bound is generous for a loaded machine:
// with the relist out of the picture, any arrival proves the event path).
// An exec'd process ending in a running container is not its exit.
func TestExitEvent(t *testing.T) {
	h, b, ctx, events := subscribed(t)

	sb := h.PodSandboxConfig("exit3", true)
	podID, err := b.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	ctrID, err := b.CreateContainer(ctx, podID, h.BusyboxContainer("exit3", "sh", "-c", "exit 3"), sb)
	require.NoError(t, err)
	require.NoError(t, b.StartContainer(ctx, ctrID))
	ev := next(t, events, ctrID, 10*time.Second)
	require.Equal(t, cri.EventStart, ev.Kind)
	ev = next(t, events, ctrID, 10*time.Second)
	require.Equal(t, cri.EventExit, ev.Kind)
	require.Equal(t, int32(3), ev.ExitCode)
	require.WithinDuration(t, time.Now(), ev.At, 2*time.Second)

	// A long-running container: an exec exiting 5 is not reported; the
	// container's own end is.
	ctrID, err = b.CreateContainer(ctx, podID, h.BusyboxContainer("sleeper", "sleep", "3600"), sb)
	require.NoError(t, err)
	require.NoError(t, b.StartContainer(ctx, ctrID))
	require.Equal(t, cri.EventStart, next(t, events, ctrID, 10*time.Second).Kind)
	_, _, err = b.ExecSync(ctx, ctrID, []string{"sh", "-c", "exit 5"}, 10*time.Second)
	require.Error(t, err)
	require.NoError(t, b.StopContainer(ctx, ctrID, 0))
	ev = next(t, events, ctrID, 10*time.Second)
	require.Equal(t, cri.EventExit, ev.Kind)
	require.Equal(t, int32(137), ev.ExitCode, "SIGKILL, not the exec's 5")
}

// TestEventsResubscribe: when the event stream drops, the backend
// subscribes again with back-off and events flow again. The drop is real:
// the backend talks to containerd through a unix socket proxy whose
// connections the test cuts.
func TestEventsResubscribe(t *testing.T) {
	h := containerd.Start(t)
	p := startProxy(t, h.Socket)
	b := runBackend(t, "unix://"+p.path)
	ctx := klog.NewContext(t.Context(), logr.Discard())
	events := b.Events(ctx)
	waitReconnect := func() {
		t.Helper()
		select {
		case <-b.OnReconnect():
		case <-time.After(60 * time.Second):
			require.FailNow(t, "never subscribed")
		}
	}
	waitReconnect()
	p.cut()
	waitReconnect()

	sb := h.PodSandboxConfig("again", true)
	podID, err := h.Runtime.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	ctrID, err := h.Runtime.CreateContainer(ctx, podID, h.BusyboxContainer("again", "sh", "-c", "exit 9"), sb)
	require.NoError(t, err)
	require.NoError(t, h.Runtime.StartContainer(ctx, ctrID))
	require.Equal(t, cri.EventStart, next(t, events, ctrID, 60*time.Second).Kind)
	ev := next(t, events, ctrID, 60*time.Second)
	require.Equal(t, cri.EventExit, ev.Kind)
	require.Equal(t, int32(9), ev.ExitCode)
}

// proxy forwards unix connections to a socket; cut closes the ones open.
type proxy struct {
	path  string
	mu    sync.Mutex
	conns []net.Conn
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	dir, err := os.MkdirTemp("", "tether-proxy-")
	require.NoError(t, err)
	p := &proxy{path: filepath.Join(dir, "p.sock")}
	lis, err := net.Listen("unix", p.path)
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("unix", target)
			if err != nil {
				_ = c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); _, _ = io.Copy(u, c); _ = u.Close() }()
			go func() { defer wg.Done(); _, _ = io.Copy(c, u); _ = c.Close() }()
		}
	}()
	t.Cleanup(func() {
		_ = lis.Close()
		p.cut()
		wg.Wait()
		_ = os.RemoveAll(dir)
	})
	return p
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		_ = c.Close() // the other side may have closed it already
	}
	p.conns = nil
}

// TestExitEventAfterCRIRecordsIt: when an exit event arrives, the CRI
// plugin already says so. containerd publishes /tasks/exit before its CRI
// plugin has deleted the task and recorded the exit, so a backend that
// passed the event straight on let a ContainerStatus right after it say
// RUNNING. Several containers exit, each with its own code, and a
// sandbox's stop is reported too; for every exit event the test asks the
// CRI at once.
func TestExitEventAfterCRIRecordsIt(t *testing.T) {
	h, b, ctx, events := subscribed(t)

	sb := h.PodSandboxConfig("exits", true)
	podID, err := b.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	const n = 4
	codes := map[string]int32{}
	for i := range n {
		name := fmt.Sprintf("exit%d", i)
		id, err := b.CreateContainer(ctx, podID, h.BusyboxContainer(name, "sh", "-c", fmt.Sprintf("exit %d", 10+i)), sb)
		require.NoError(t, err)
		codes[id] = int32(10 + i)
	}
	for id := range codes {
		require.NoError(t, b.StartContainer(ctx, id))
	}
	for len(codes) > 0 {
		var ev cri.Event
		select {
		case ev = <-events:
		case <-time.After(30 * time.Second):
			require.FailNow(t, "exit events missing", "for %v", codes)
		}
		want, ours := codes[ev.ContainerID]
		if !ours || ev.Kind != cri.EventExit {
			continue
		}
		st, err := b.ContainerStatus(ctx, ev.ContainerID, false)
		require.NoError(t, err)
		require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, st.GetStatus().GetState(),
			"on the exit event the CRI already shows the container exited")
		require.Equal(t, want, st.GetStatus().GetExitCode())
		require.Equal(t, want, ev.ExitCode)
		delete(codes, ev.ContainerID)
	}

	// The sandbox's own exit (its pause process killed by StopPodSandbox)
	// comes once the CRI shows it not ready.
	require.NoError(t, b.StopPodSandbox(ctx, podID))
	ev := next(t, events, podID, 30*time.Second)
	require.Equal(t, cri.EventExit, ev.Kind)
	sst, err := b.PodSandboxStatus(ctx, podID, false)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.PodSandboxState_SANDBOX_NOTREADY, sst.GetStatus().GetState())
}
