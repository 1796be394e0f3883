package vm_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	remote "k8s.io/cri-client/pkg"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/edgecore/cri"
	"github.com/tetheredge/tether/edgecore/runtime/containerd"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/store"
	ctrdhost "github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tests/vmguest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func quiet(ctx context.Context) context.Context { return klog.NewContext(ctx, logr.Discard()) }

// env is a VM backend on a real store, with the test guest imported.
type env struct {
	t      *testing.T
	st     *store.Store
	images *vm.Images
	cfg    vm.Config
	logs   string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := t.Context()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "edge.db"), nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, st.Close()) })
	images, err := vm.OpenImages(filepath.Join(t.TempDir(), "vm-images"), "")
	require.NoError(t, err)
	vmguest.Import(t, images)
	return &env{
		t: t, st: st, images: images, logs: t.TempDir(),
		cfg: vm.Config{Images: images, RunDir: vmguest.RunDir(t), Accel: vmguest.Accel(t), Logger: testlog.New()},
	}
}

// backend starts a backend on the env's store; it is closed (QEMUs left
// running) when the test ends unless closed before.
func (e *env) backend() *vm.Backend {
	e.t.Helper()
	b, err := vm.New(e.t.Context(), e.cfg, e.st.Allocations())
	require.NoError(e.t, err)
	e.t.Cleanup(func() { require.NoError(e.t, b.Close(context.Background())) })
	return b
}

// sandbox is a VM sandbox config for pod name with annotations ann on top
// of one vCPU and 128Mi.
func (e *env) sandbox(name string, ann map[string]string) *runtimeapi.PodSandboxConfig {
	a := map[string]string{vm.AnnotationName: name, vm.AnnotationVCPUs: "1", vm.AnnotationMemory: "128Mi"}
	for k, v := range ann {
		a[k] = v
	}
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "default", Uid: "uid-" + name},
		LogDirectory: filepath.Join(e.logs, name),
		Labels:       map[string]string{"io.kubernetes.pod.uid": "uid-" + name, "io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": "default"},
		Annotations:  a,
	}
}

func compute(name string) *runtimeapi.ContainerConfig {
	return &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: name},
		Image:    &runtimeapi.ImageSpec{Image: vmguest.ImageName, RuntimeHandler: "tether-vm"},
		Labels:   map[string]string{"io.kubernetes.container.name": name, "io.kubernetes.pod.uid": "uid-web"},
		LogPath:  name + "_0.log",
	}
}

// guestOf reads the guest info of a container status.
func guestOf(t *testing.T, resp *runtimeapi.ContainerStatusResponse) vm.GuestInfo {
	t.Helper()
	var gi vm.GuestInfo
	require.NoError(t, json.Unmarshal([]byte(resp.GetInfo()[vm.InfoGuest]), &gi))
	return gi
}

func alive(pid int) bool { return pid > 0 && syscall.Kill(pid, 0) == nil }

// shim serves a CRI shim with a containerd default backend and b in the
// VM slot, and returns cri-client clients of it.
func shim(t *testing.T, h *ctrdhost.Host, st *store.Store, b *vm.Backend) (internalapi.RuntimeService, internalapi.ImageManagerService) {
	t.Helper()
	ctx := quiet(context.Background())
	def, err := containerd.New(ctx, containerd.Config{Endpoint: h.Endpoint()})
	require.NoError(t, err)
	sock := filepath.Join(vmguest.RunDir(t), "cri.sock")
	srv, err := cri.New(cri.Config{Listen: sock}, cri.Backends{Default: def, VM: b}, st.RuntimeIDs())
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.Run(runCtx) }()
	require.Eventually(t, func() bool {
		c, err := net.Dial("unix", sock)
		if err == nil {
			_ = c.Close()
		}
		return err == nil
	}, 10*time.Second, 10*time.Millisecond)
	rt, err := remote.NewRemoteRuntimeService(ctx, "unix://"+sock, time.Minute, nil, false)
	require.NoError(t, err)
	img, err := remote.NewRemoteImageService(ctx, "unix://"+sock, time.Minute, nil, false)
	require.NoError(t, err)
	t.Cleanup(func() {
		require.NoError(t, errors.Join(rt.Close(ctx), img.Close(ctx)))
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, def.Close(ctx))
	})
	return rt, img
}

// TestVMThroughShim runs the test guest through the CRI shim with the CRI
// client a kubelet uses and the VM handler: runp, image status, create,
// start, the boot marker in the container's log, inspect with the guest
// info, stop (graceful: the guest powers off on the ACPI button), rm,
// stopp, rmp; then nothing is left: no QEMU, no sandbox directory, no
// allocation rows.
func TestVMThroughShim(t *testing.T) {
	h := ctrdhost.Start(t)
	e := newEnv(t)
	b := e.backend()
	rt, img := shim(t, h, e.st, b)
	ctx := quiet(t.Context())

	st, err := img.ImageStatus(ctx, &runtimeapi.ImageSpec{Image: vmguest.ImageName, RuntimeHandler: "tether-vm"}, false)
	require.NoError(t, err)
	require.NotNil(t, st.GetImage(), "the imported guest is an image of the VM handler")
	_, err = img.PullImage(ctx, &runtimeapi.ImageSpec{Image: "not-imported", RuntimeHandler: "tether-vm"}, nil, nil)
	require.Equal(t, codes.NotFound, status.Code(err))
	require.ErrorContains(t, err, "import it with edgecore vm-image import")

	sbCfg := e.sandbox("web", nil)
	sb, err := rt.RunPodSandbox(ctx, sbCfg, "tether-vm")
	require.NoError(t, err)
	rows, err := e.st.Allocations().Owner(ctx, sb)
	require.NoError(t, err)
	require.Len(t, rows, 1, "the VM record")
	require.Equal(t, vm.KindVM, rows[0].Kind)

	cfg := compute("compute")
	id, err := rt.CreateContainer(ctx, sb, cfg, sbCfg)
	require.NoError(t, err)
	_, err = rt.CreateContainer(ctx, sb, compute("second"), sbCfg)
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "one guest per VM sandbox: %v", err)
	require.NoError(t, rt.StartContainer(ctx, id))

	logPath := filepath.Join(sbCfg.LogDirectory, cfg.LogPath)
	require.Eventually(t, func() bool { return vmguest.CountMarker(logPath, vm.BootMarker) == 1 },
		2*time.Minute, 100*time.Millisecond, "the boot marker in the container's log")
	require.Eventually(t, func() bool {
		resp, err := rt.ContainerStatus(ctx, id, true)
		require.NoError(t, err)
		require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, resp.GetStatus().GetState())
		require.Equal(t, logPath, resp.GetStatus().GetLogPath())
		gi := guestOf(t, resp)
		require.Equal(t, vmguest.Accel(t), gi.Acceleration)
		if gi.BootedAt == "" {
			return false
		}
		require.Contains(t, gi.Console, vm.BootMarker)
		return true
	}, 30*time.Second, 50*time.Millisecond, "the guest info says booted")
	pid := qemuPid(t, e.st, sb)
	require.True(t, alive(pid))

	list, err := rt.ListContainers(ctx, &runtimeapi.ContainerFilter{LabelSelector: map[string]string{"io.kubernetes.pod.uid": "uid-web"}})
	require.NoError(t, err)
	require.Len(t, list, 1)
	sbs, err := rt.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{LabelSelector: map[string]string{"io.kubernetes.pod.uid": "uid-web"}})
	require.NoError(t, err)
	require.Len(t, sbs, 1)
	require.Equal(t, runtimeapi.PodSandboxState_SANDBOX_READY, sbs[0].GetState())
	_, _, err = rt.ExecSync(ctx, id, []string{"true"}, time.Second)
	require.Equal(t, codes.Unimplemented, status.Code(err))
	require.Error(t, img.RemoveImage(ctx, &runtimeapi.ImageSpec{Image: vmguest.ImageName, RuntimeHandler: "tether-vm"}),
		"an image a VM's disk backs onto stays")

	require.NoError(t, rt.StopContainer(ctx, id, 60))
	resp, err := rt.ContainerStatus(ctx, id, true)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, resp.GetStatus().GetState())
	require.Equal(t, int32(0), resp.GetStatus().GetExitCode(), "the guest powered off: QEMU exited 0")
	require.Equal(t, 1, vmguest.CountMarker(logPath, "TETHER-GUEST-POWERDOWN"), "a graceful powerdown, not quit")
	require.False(t, alive(pid))

	require.NoError(t, rt.RemoveContainer(ctx, id))
	require.NoError(t, rt.StopPodSandbox(ctx, sb))
	require.NoError(t, rt.RemovePodSandbox(ctx, sb))
	all, err := e.st.Allocations().Kind(ctx, "")
	require.NoError(t, err)
	require.Empty(t, all, "no allocation rows left")
	ents, err := os.ReadDir(e.cfg.RunDir)
	require.NoError(t, err)
	for _, ent := range ents {
		require.Equal(t, "cri.sock", ent.Name(), "no sandbox directory (overlay) left")
	}
	ids, err := e.st.RuntimeIDs().List(ctx)
	require.NoError(t, err)
	require.Empty(t, ids)
	require.NoError(t, img.RemoveImage(ctx, &runtimeapi.ImageSpec{Image: vmguest.ImageName, RuntimeHandler: "tether-vm"}))
}

// qemuPid reads the QEMU pid of sandbox sb's live container from its record.
func qemuPid(t *testing.T, st *store.Store, sb string) int {
	t.Helper()
	rows, err := st.Allocations().Owner(t.Context(), sb)
	require.NoError(t, err)
	for _, r := range rows {
		if r.Kind != vm.KindVM {
			continue
		}
		var rec struct {
			Containers []struct {
				Pid   int    `json:"pid"`
				State string `json:"state"`
			} `json:"containers"`
		}
		require.NoError(t, json.Unmarshal(r.Detail, &rec))
		for _, c := range rec.Containers {
			if c.State == "running" {
				return c.Pid
			}
		}
	}
	return 0
}
