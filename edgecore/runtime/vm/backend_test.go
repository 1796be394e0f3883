package vm_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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
	"github.com/tetheredge/tether/tests/hugepages"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tests/vmguest"
)

// TestMain fails the package on goroutines left behind. gRPC's client
// goroutines end asynchronously after Close, later than goleak's own ~2 s
// of retries on a loaded machine, so it is given up to 20 s; a goroutine
// that never ends still fails.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		err := goleak.Find()
		for deadline := time.Now().Add(20 * time.Second); err != nil && time.Now().Before(deadline); err = goleak.Find() {
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

func quiet(ctx context.Context) context.Context { return klog.NewContext(ctx, logr.Discard()) }

// env is a VM backend on a real store, with the test guest imported.
type env struct {
	t      testing.TB
	st     *store.Store
	images *vm.Images
	cfg    vm.Config
	logs   string
}

func newEnv(t testing.TB) *env {
	t.Helper()
	ctx := t.Context()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "edge.db"), nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, st.Close()) })
	runDir := vmguest.RunDir(t)
	images, err := vm.OpenImages(filepath.Join(t.TempDir(), "vm-images"), "")
	require.NoError(t, err)
	vmguest.Import(t, images)
	return &env{
		t: t, st: st, images: images, logs: t.TempDir(),
		cfg: vm.Config{Images: images, RunDir: runDir, Accel: vmguest.Accel(t), Logger: testlog.New()},
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
func shim(t testing.TB, h *ctrdhost.Host, st *store.Store, b *vm.Backend) (internalapi.RuntimeService, internalapi.ImageManagerService) {
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

	sbCfg := e.sandbox("web", map[string]string{vm.AnnotationUserData: "#cloud-config\nhostname: web\n"})
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
		4*time.Minute, 100*time.Millisecond, "the boot marker in the container's log")
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
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	require.NoError(t, err)
	seed := filepath.Join(e.cfg.RunDir, sb, "seed.iso")
	require.Contains(t, string(cmdline), "file="+seed, "the user data goes in as a NoCloud seed")
	out, err := exec.Command("blkid", "-p", "-o", "value", "-s", "LABEL", seed).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Equal(t, "cidata\n", string(out))

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

// startVM runs a sandbox and its guest on b directly (no shim) and waits
// for the boot marker; it returns the sandbox and container ids and the
// console's path.
func (e *env) startVM(b *vm.Backend, name string, ann map[string]string) (sb, id, console string) {
	e.t.Helper()
	ctx := e.t.Context()
	sbCfg := e.sandbox(name, ann)
	sb, err := b.RunPodSandbox(ctx, sbCfg, "tether-vm")
	require.NoError(e.t, err)
	cfg := compute("compute")
	id, err = b.CreateContainer(ctx, sb, cfg, sbCfg)
	require.NoError(e.t, err)
	require.NoError(e.t, b.StartContainer(ctx, id))
	console = filepath.Join(sbCfg.LogDirectory, cfg.LogPath)
	require.Eventually(e.t, func() bool { return vmguest.CountMarker(console, vm.BootMarker) == 1 },
		4*time.Minute, 100*time.Millisecond, "the boot marker")
	return sb, id, console
}

// A new backend on the same store (EdgeCore restarted: the old one just
// stopped watching, as after a SIGKILL) adopts the running QEMU: same pid,
// the guest never restarted (one boot marker), the allocation rows
// unchanged, and it can still power the guest down. A recorded QEMU that
// died meanwhile is reported exited.
func TestAdoptAfterRestart(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	b1, err := vm.New(ctx, e.cfg, e.st.Allocations())
	require.NoError(t, err)
	sb, id, console := e.startVM(b1, "keep", nil)
	sbGone, idGone, _ := e.startVM(b1, "gone", nil)
	// Wait for the boot to be recorded, then stop watching.
	require.Eventually(t, func() bool {
		resp, err := b1.ContainerStatus(ctx, id, true)
		return err == nil && guestOf(t, resp).BootedAt != ""
	}, 30*time.Second, 20*time.Millisecond)
	pid, pidGone := qemuPid(t, e.st, sb), qemuPid(t, e.st, sbGone)
	require.NoError(t, b1.Close(ctx))
	require.True(t, alive(pid), "QEMU outlives its backend")
	before, err := e.st.Allocations().Kind(ctx, "")
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(pidGone, syscall.SIGKILL))
	// QEMU is this test's child (in EdgeCore it would be init's after the
	// SIGKILL): reap it.
	_, err = syscall.Wait4(pidGone, nil, 0, nil)
	require.NoError(t, err)

	b2 := e.backend()
	resp, err := b2.ContainerStatus(ctx, id, true)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, resp.GetStatus().GetState(), "adopted, not restarted")
	require.NotEmpty(t, guestOf(t, resp).BootedAt, "the boot is remembered")
	require.Equal(t, pid, qemuPid(t, e.st, sb))
	after, err := e.st.Allocations().Owner(ctx, sb)
	require.NoError(t, err)
	var kept []store.Allocation
	for _, r := range before {
		if r.Owner == sb {
			kept = append(kept, r)
		}
	}
	require.Equal(t, kept, after, "the adopted VM's allocations are unchanged")

	gone, err := b2.ContainerStatus(ctx, idGone, false)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, gone.GetStatus().GetState())
	require.Equal(t, "QEMUGone", gone.GetStatus().GetReason())

	require.NoError(t, b2.StopContainer(ctx, id, 60))
	resp, err = b2.ContainerStatus(ctx, id, false)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, resp.GetStatus().GetState())
	require.Equal(t, int32(0), resp.GetStatus().GetExitCode(), "the guest shut down (QMP SHUTDOWN guest=true)")
	require.False(t, alive(pid))
	require.Equal(t, 1, vmguest.CountMarker(console, vm.BootMarker), "the guest booted once")
	for _, s := range []string{sb, sbGone} {
		require.NoError(t, b2.RemovePodSandbox(ctx, s))
	}
	all, err := e.st.Allocations().Kind(ctx, "")
	require.NoError(t, err)
	require.Empty(t, all)
}

// Bad sandboxes are refused with a clear code and message naming the
// annotation, counted, and leave nothing behind.
func TestRefusesBadSandboxes(t *testing.T) {
	e := newEnv(t)
	reg := promtest.NewRegistry()
	e.cfg.Registerer = reg
	b := e.backend()
	ctx := t.Context()
	for _, tc := range []struct {
		name string
		ann  map[string]string
		code codes.Code
		want string
	}{
		{"no vcpus", map[string]string{vm.AnnotationVCPUs: ""}, codes.InvalidArgument, vm.AnnotationVCPUs},
		{"zero vcpus", map[string]string{vm.AnnotationVCPUs: "0"}, codes.InvalidArgument, vm.AnnotationVCPUs},
		{"bad memory", map[string]string{vm.AnnotationMemory: "lots"}, codes.InvalidArgument, vm.AnnotationMemory},
		{"tiny memory", map[string]string{vm.AnnotationMemory: "1Mi"}, codes.InvalidArgument, vm.AnnotationMemory},
		{"odd hugepage size", map[string]string{vm.AnnotationHugepageSize: "4Ki"}, codes.InvalidArgument, vm.AnnotationHugepageSize},
		{"memory not whole pages", map[string]string{vm.AnnotationHugepageSize: "1Gi"}, codes.InvalidArgument, "not a whole number of 1Gi hugepages"},
		{"dedicated not bool", map[string]string{vm.AnnotationDedicatedCPUs: "yes"}, codes.InvalidArgument, vm.AnnotationDedicatedCPUs},
		{"sriov syntax", map[string]string{vm.AnnotationSRIOV: "pool-a"}, codes.InvalidArgument, vm.AnnotationSRIOV},
		{"sriov twice", map[string]string{vm.AnnotationSRIOV: "a=1,a=2"}, codes.InvalidArgument, "named twice"},
		{"bad disk size", map[string]string{vm.AnnotationDiskSize: "-1"}, codes.InvalidArgument, vm.AnnotationDiskSize},
		{"huge user data", map[string]string{vm.AnnotationUserData: string(make([]byte, vm.MaxUserData+1))}, codes.InvalidArgument, vm.AnnotationUserData},
		{"dedicated without pool", map[string]string{vm.AnnotationDedicatedCPUs: "true"}, codes.FailedPrecondition, "no resource pool configured, so it cannot give dedicated CPUs"},
		{"vfs without pool", map[string]string{vm.AnnotationSRIOV: "pool-a=1"}, codes.FailedPrecondition, "SR-IOV VFs"},
		{"hugepages without a mount", map[string]string{vm.AnnotationHugepageSize: "2Mi"}, codes.FailedPrecondition, "no hugetlbfs mount of 2Mi pages"},
		{"huge labels", map[string]string{"big": strings.Repeat("x", store.MaxAllocationDetail)}, codes.InvalidArgument, "labels and annotations"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := e.sandbox("bad", tc.ann)
			if tc.ann[vm.AnnotationVCPUs] == "" && tc.name == "no vcpus" {
				delete(cfg.Annotations, vm.AnnotationVCPUs)
			}
			_, err := b.RunPodSandbox(ctx, cfg, "tether-vm")
			require.Equal(t, tc.code, status.Code(err), "%v", err)
			require.ErrorContains(t, err, tc.want)
		})
	}
	sbs, err := b.ListPodSandbox(ctx, nil)
	require.NoError(t, err)
	require.Empty(t, sbs)
	require.Equal(t, 12.0, promtest.Sum(t, reg, "tether_vm_refused_total", map[string]string{"call": "RunPodSandbox", "reason": "annotation"}))
	require.Equal(t, 2.0, promtest.Sum(t, reg, "tether_vm_refused_total", map[string]string{"call": "RunPodSandbox", "reason": "no_pool"}))
	all, err := e.st.Allocations().Kind(ctx, "")
	require.NoError(t, err)
	require.Empty(t, all)
	ents, err := os.ReadDir(e.cfg.RunDir)
	require.NoError(t, err)
	require.Empty(t, ents)

	// A container of an image the store lacks.
	sbCfg := e.sandbox("noimage", nil)
	sb, err := b.RunPodSandbox(ctx, sbCfg, "tether-vm")
	require.NoError(t, err)
	cfg := compute("compute")
	cfg.Image.Image = "missing"
	_, err = b.CreateContainer(ctx, sb, cfg, sbCfg)
	require.Equal(t, codes.NotFound, status.Code(err))
	require.ErrorContains(t, err, "import it with edgecore vm-image import")
	require.NoError(t, b.RemovePodSandbox(ctx, sb))
}

const nrHugepages = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"

func readInt(t *testing.T, path string) int64 {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	n, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	require.NoError(t, err)
	return n
}

// Without a resource pool, a VM's hugepages come from the configured
// hugetlbfs mount and are accounted in the allocation table against the
// kernel's page count: the guest's RAM really is hugepages (HugePages_Free
// drops while it runs, and comes back), and a VM that does not fit beside
// it is refused with ResourceExhausted, leaving nothing. The test reserves
// 80 more pages and mounts hugetlbfs itself, and undoes both.
func TestHugepagesWithoutPool(t *testing.T) {
	hugepages.Lock(t)
	const pages = 64 + 16 // the guest's 128Mi, and 32Mi more
	before := readInt(t, nrHugepages)
	require.NoError(t, os.WriteFile(nrHugepages, []byte(strconv.FormatInt(before+pages, 10)), 0o644))
	t.Cleanup(func() {
		now := readInt(t, nrHugepages)
		require.NoError(t, os.WriteFile(nrHugepages, []byte(strconv.FormatInt(max(now-pages, 0), 10)), 0o644))
	})
	require.GreaterOrEqual(t, readInt(t, nrHugepages), before+pages, "the kernel reserved the pages")
	mnt := t.TempDir()
	require.NoError(t, syscall.Mount("hugetlbfs", mnt, "hugetlbfs", 0, "pagesize=2M"))
	t.Cleanup(func() { require.NoError(t, syscall.Unmount(mnt, 0)) })

	e := newEnv(t)
	e.cfg.HugepageDirs = map[string]string{"2Mi": mnt}
	b := e.backend()
	ctx := t.Context()
	free := hugepages.Free(t)
	sb, id, _ := e.startVM(b, "huge", map[string]string{vm.AnnotationHugepageSize: "2Mi"})
	rows, err := e.st.Allocations().Kind(ctx, "hugepages-2Mi")
	require.NoError(t, err)
	require.Len(t, rows, 1)
	require.Equal(t, sb, rows[0].Owner)
	require.Equal(t, int64(128<<20), rows[0].Amount)
	require.LessOrEqual(t, hugepages.Free(t), free-64, "the guest's RAM is hugepages (prealloc)")

	total := readInt(t, nrHugepages) * 2 << 20
	tooBig := map[string]string{vm.AnnotationHugepageSize: "2Mi",
		vm.AnnotationMemory: strconv.FormatInt((total-128<<20+2<<20)>>20, 10) + "Mi"}
	_, err = b.RunPodSandbox(ctx, e.sandbox("toobig", tooBig), "tether-vm")
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	sbs, err := b.ListPodSandbox(ctx, nil)
	require.NoError(t, err)
	require.Len(t, sbs, 1, "the refused VM left nothing")

	require.NoError(t, b.StopContainer(ctx, id, 60))
	require.NoError(t, b.StopPodSandbox(ctx, sb))
	rows, err = e.st.Allocations().Kind(ctx, "hugepages-2Mi")
	require.NoError(t, err)
	require.Len(t, rows, 1)
	require.Zero(t, rows[0].Amount, "a stopped sandbox holds no hugepages")
	require.Eventually(t, func() bool { return hugepages.Free(t) >= free }, 10*time.Second, 20*time.Millisecond,
		"the pages come back")
	require.NoError(t, b.RemovePodSandbox(ctx, sb))
	all, err := e.st.Allocations().Kind(ctx, "")
	require.NoError(t, err)
	require.Empty(t, all)
}
