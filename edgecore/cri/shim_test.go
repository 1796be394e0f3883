package cri_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	remote "k8s.io/cri-client/pkg"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/edgecore/cri"
	ctrd "github.com/tetheredge/tether/edgecore/runtime/containerd"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func quiet(ctx context.Context) context.Context { return klog.NewContext(ctx, logr.Discard()) }

// shim is a running shim on a socket in a temporary directory, with
// cri-client clients connected to it and a raw gRPC client for requests
// cri-client would not send.
type shim struct {
	socket  string
	Runtime internalapi.RuntimeService
	Images  internalapi.ImageManagerService
	Raw     runtimeapi.RuntimeServiceClient
	RawImg  runtimeapi.ImageServiceClient
	stop    func()
}

type shimOpts struct {
	cfg     cri.Config
	db      string      // SQLite file; default a new one
	vm      cri.Backend // the VM backend slot; default empty
	wrapDef func(cri.Backend) cri.Backend
}

// startShim serves a shim over a containerd backend of h. It stops when
// the test ends, before the host's teardown.
func startShim(t testing.TB, h *containerd.Host, o shimOpts) *shim {
	t.Helper()
	ctx := quiet(context.Background())
	if o.db == "" {
		o.db = filepath.Join(t.TempDir(), "edge.db")
	}
	st, err := store.Open(ctx, o.db, nil)
	require.NoError(t, err)
	b, err := ctrd.New(ctx, ctrd.Config{Endpoint: h.Endpoint()})
	require.NoError(t, err)
	var def cri.Backend = b
	if o.wrapDef != nil {
		def = o.wrapDef(b)
	}
	cfg := o.cfg
	cfg.Listen = filepath.Join(shortTempDir(t), "cri.sock")
	srv, err := cri.New(cfg, cri.Backends{Default: def, VM: o.vm}, st.RuntimeIDs())
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	done, events := make(chan error, 1), make(chan error, 1)
	go func() { done <- srv.Run(runCtx) }()
	go func() { events <- b.Run(runCtx) }()
	require.Eventually(t, func() bool {
		c, err := net.Dial("unix", cfg.Listen)
		if err == nil {
			_ = c.Close()
		}
		return err == nil
	}, 10*time.Second, 10*time.Millisecond, "the shim never listened")

	s := &shim{socket: cfg.Listen}
	s.Runtime, err = remote.NewRemoteRuntimeService(ctx, "unix://"+cfg.Listen, time.Minute, nil, false)
	require.NoError(t, err)
	s.Images, err = remote.NewRemoteImageService(ctx, "unix://"+cfg.Listen, time.Minute, nil, false)
	require.NoError(t, err)
	conn, err := grpc.NewClient("unix://"+cfg.Listen, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	s.Raw, s.RawImg = runtimeapi.NewRuntimeServiceClient(conn), runtimeapi.NewImageServiceClient(conn)
	var once atomic.Bool
	s.stop = func() {
		if !once.CompareAndSwap(false, true) {
			return
		}
		require.NoError(t, errors.Join(s.Runtime.Close(ctx), s.Images.Close(ctx), conn.Close()))
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, <-events)
		require.NoError(t, errors.Join(b.Close(ctx), st.Close()))
		_, err := os.Stat(cfg.Listen)
		require.ErrorIs(t, err, os.ErrNotExist, "Run removes its socket")
	}
	t.Cleanup(s.stop)
	return s
}

// shortTempDir is a directory under /tmp: a unix socket path must stay
// under 108 bytes, and t.TempDir's can be longer.
func shortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "tether-cri-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// TestShimRunsBusybox drives a busybox container through the shim with the
// CRI client a kubelet uses: runp, create, start, ps, inspect, exec, logs,
// stop, rm.
func TestShimRunsBusybox(t *testing.T) {
	h := containerd.Start(t)
	s := startShim(t, h, shimOpts{})
	ctx := quiet(t.Context())

	v, err := s.Runtime.Version(ctx, "v1")
	require.NoError(t, err)
	require.Equal(t, "containerd", v.GetRuntimeName())
	st, err := s.Runtime.Status(ctx, false)
	require.NoError(t, err)
	require.NotEmpty(t, st.GetStatus().GetConditions())

	sb := h.PodSandboxConfig("web", true)
	podID, err := s.Runtime.RunPodSandbox(ctx, sb, "runc")
	require.NoError(t, err)
	c := h.BusyboxContainer("web", "sh", "-c", "echo hello from busybox; exec sleep 3600")
	ctrID, err := s.Runtime.CreateContainer(ctx, podID, c, sb)
	require.NoError(t, err)
	require.NoError(t, s.Runtime.StartContainer(ctx, ctrID))

	pods, err := s.Runtime.ListPodSandbox(ctx, nil)
	require.NoError(t, err)
	require.Len(t, pods, 1)
	require.Equal(t, podID, pods[0].GetId())
	ctrs, err := s.Runtime.ListContainers(ctx, &runtimeapi.ContainerFilter{PodSandboxId: podID})
	require.NoError(t, err)
	require.Len(t, ctrs, 1)
	require.Equal(t, ctrID, ctrs[0].GetId())

	cst, err := s.Runtime.ContainerStatus(ctx, ctrID, true)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, cst.GetStatus().GetState())
	pst, err := s.Runtime.PodSandboxStatus(ctx, podID, false)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.PodSandboxState_SANDBOX_READY, pst.GetStatus().GetState())

	out, _, err := s.Runtime.ExecSync(ctx, ctrID, []string{"sh", "-c", "echo exec in $HOSTNAME; ls /bin/busybox"}, 10*time.Second)
	require.NoError(t, err)
	require.Contains(t, string(out), "/bin/busybox")
	// A non-zero exit code is a response, not an error, on the wire.
	resp, err := s.Raw.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: ctrID, Cmd: []string{"sh", "-c", "echo oops >&2; exit 4"}, Timeout: 10})
	require.NoError(t, err)
	require.Equal(t, int32(4), resp.GetExitCode())
	require.Equal(t, "oops\n", string(resp.GetStderr()))

	ex, err := s.Runtime.Exec(ctx, &runtimeapi.ExecRequest{ContainerId: ctrID, Cmd: []string{"sh"}, Stdout: true})
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(ex.GetUrl(), "http://127.0.0.1:"), "the backend's streaming URL: %s", ex.GetUrl())

	require.Eventually(t, func() bool {
		b, err := os.ReadFile(cst.GetStatus().GetLogPath())
		return err == nil && strings.Contains(string(b), " stdout F hello from busybox")
	}, 10*time.Second, 20*time.Millisecond, "the container's log")
	require.NoError(t, s.Runtime.ReopenContainerLog(ctx, ctrID))

	stats, err := s.Runtime.ContainerStats(ctx, ctrID)
	require.NoError(t, err)
	require.Equal(t, ctrID, stats.GetAttributes().GetId())
	all, err := s.Runtime.ListContainerStats(ctx, nil)
	require.NoError(t, err)
	require.Len(t, all, 1)
	imgs, err := s.Images.ListImages(ctx, nil)
	require.NoError(t, err)
	require.NotEmpty(t, imgs)
	ist, err := s.Images.ImageStatus(ctx, &runtimeapi.ImageSpec{Image: h.BusyboxImage}, false)
	require.NoError(t, err)
	require.NotNil(t, ist.GetImage())

	require.NoError(t, s.Runtime.StopContainer(ctx, ctrID, 0))
	cst, err = s.Runtime.ContainerStatus(ctx, ctrID, false)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, cst.GetStatus().GetState())
	require.NoError(t, s.Runtime.RemoveContainer(ctx, ctrID))
	require.NoError(t, s.Runtime.StopPodSandbox(ctx, podID))
	require.NoError(t, s.Runtime.RemovePodSandbox(ctx, podID))
	pods, err = s.Runtime.ListPodSandbox(ctx, nil)
	require.NoError(t, err)
	require.Empty(t, pods)
}

// TestShimRefuses: handlers without a backend, unknown handlers and
// requests missing required fields are refused with the right codes;
// the backend's NotFound comes through as NotFound.
func TestShimRefuses(t *testing.T) {
	h := containerd.Start(t)
	s := startShim(t, h, shimOpts{})
	ctx := quiet(t.Context())
	sb := h.PodSandboxConfig("refused", true)

	_, err := s.Runtime.RunPodSandbox(ctx, sb, "tether-vm")
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "%v", err)
	require.Contains(t, err.Error(), `runtime handler "tether-vm" has no backend on this node`)

	_, err = s.Runtime.RunPodSandbox(ctx, sb, "kata")
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.Contains(t, err.Error(), `unknown runtime handler "kata" (known: "", "runc", "tether-vm")`)

	_, err = s.Runtime.ContainerStatus(ctx, "0123456789abcdef", false)
	require.Equal(t, codes.NotFound, status.Code(err), "the backend's code survives cri-client and the shim: %v", err)
	_, err = s.Runtime.PodSandboxStatus(ctx, "0123456789abcdef", false)
	require.Equal(t, codes.NotFound, status.Code(err), "%v", err)

	for name, call := range map[string]func() error{
		"runp without config": func() error { _, err := s.Raw.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{}); return err },
		"runp without name": func() error {
			_, err := s.Raw.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: &runtimeapi.PodSandboxConfig{Metadata: &runtimeapi.PodSandboxMetadata{}}})
			return err
		},
		"create without sandbox": func() error {
			_, err := s.Raw.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{Config: h.BusyboxContainer("x"), SandboxConfig: sb})
			return err
		},
		"create without image": func() error {
			_, err := s.Raw.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: "p", Config: &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "x"}}, SandboxConfig: sb})
			return err
		},
		"start without id":   func() error { _, err := s.Raw.StartContainer(ctx, &runtimeapi.StartContainerRequest{}); return err },
		"status without id":  func() error { _, err := s.Raw.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{}); return err },
		"stop without id":    func() error { _, err := s.Raw.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{}); return err },
		"exec without cmd":   func() error { _, err := s.Raw.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: "c"}); return err },
		"pull without image": func() error { _, err := s.RawImg.PullImage(ctx, &runtimeapi.PullImageRequest{}); return err },
		"update config nil": func() error {
			_, err := s.Raw.UpdateRuntimeConfig(ctx, &runtimeapi.UpdateRuntimeConfigRequest{})
			return err
		},
	} {
		require.Equal(t, codes.InvalidArgument, status.Code(call()), name)
	}

	// What containerd 1.6 does not implement stays Unimplemented; what the
	// shim does not serve (the streaming lists) is Unimplemented too.
	_, err = s.Raw.CheckpointContainer(ctx, &runtimeapi.CheckpointContainerRequest{ContainerId: "c"})
	require.Equal(t, codes.Unimplemented, status.Code(err), "%v", err)
	stream, err := s.Raw.StreamPodSandboxes(ctx, &runtimeapi.StreamPodSandboxesRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.Equal(t, codes.Unimplemented, status.Code(err), "%v", err)
}

// TestGetContainerEvents: the shim streams the containerd backend's start
// and exit as CRI events (containerd 1.6 itself answers Unimplemented).
func TestGetContainerEvents(t *testing.T) {
	h := containerd.Start(t)
	s := startShim(t, h, shimOpts{})
	ctx := quiet(t.Context())
	stream, err := s.Raw.GetContainerEvents(ctx, &runtimeapi.GetEventsRequest{})
	require.NoError(t, err)
	// The shim sends the headers once it is subscribed.
	_, err = stream.Header()
	require.NoError(t, err)

	sb := h.PodSandboxConfig("events", true)
	podID, err := s.Runtime.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	ctrID, err := s.Runtime.CreateContainer(ctx, podID, h.BusyboxContainer("events", "sh", "-c", "exit 3"), sb)
	require.NoError(t, err)
	require.NoError(t, s.Runtime.StartContainer(ctx, ctrID))
	var got []runtimeapi.ContainerEventType
	for len(got) < 2 {
		ev, err := stream.Recv()
		require.NoError(t, err)
		require.NotEqual(t, podID, ev.GetContainerId(), "sandbox events are not sent")
		if ev.GetContainerId() == ctrID {
			got = append(got, ev.GetContainerEventType())
			require.NotEmpty(t, ev.GetContainersStatuses())
			if ev.GetContainerEventType() == runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT {
				st := ev.GetContainersStatuses()[0]
				require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, st.GetState(), "the stopped event carries the exited status")
				require.Equal(t, int32(3), st.GetExitCode())
			}
		}
	}
	require.Equal(t, []runtimeapi.ContainerEventType{
		runtimeapi.ContainerEventType_CONTAINER_STARTED_EVENT, runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT,
	}, got)
}
