package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	nodev1 "k8s.io/api/node/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"

	cloudvm "github.com/tetheredge/tether/cloudcore/vm"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/hugepages"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/vmcheck"
	"github.com/tetheredge/tether/tests/vmguest"
)

// ensureRuntimeClass applies build/runtimeclass-vm.yaml.
func ensureRuntimeClass(t testing.TB, cs kubernetes.Interface) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "build", "runtimeclass-vm.yaml"))
	require.NoError(t, err)
	var rc nodev1.RuntimeClass
	require.NoError(t, yaml.UnmarshalStrict(b, &rc))
	if _, err := cs.NodeV1().RuntimeClasses().Create(t.Context(), &rc, metav1.CreateOptions{}); !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
}

// vmSite is a cluster with one edge node that runs VMs: CloudCore with
// the VM controller, EdgeCore with the in-process shim (real containerd),
// the VM backend (real QEMU) and the resource pool, the test guest
// imported.
type vmSite struct {
	cs             kubernetes.Interface
	api            *rest.Config
	ns, node       string
	vms            *cloudvm.Client
	cloud          *cloud
	edge           *edge
	images         *vm.Images // the edge's image store (the test's handle on it)
	runDir, logDir string
}

// startVMSite starts a vmSite; hugetlbfs, when not "", is the pool's 2Mi
// mount. logger, when set, is EdgeCore's and CloudCore's.
func startVMSite(tb testing.TB, node, hugetlbfs string, logger ...*slog.Logger) *vmSite {
	tb.Helper()
	env := cp.Env(tb)
	x := &vmSite{cs: adminClient(tb, env.Config), api: env.Config, ns: env.Namespace(tb), node: node}
	ensureRuntimeClass(tb, x.cs)
	dyn, err := dynamic.NewForConfig(env.Config)
	require.NoError(tb, err)
	x.vms = cloudvm.NewClient(dyn)
	ctr := containerd.Start(tb)
	co := cloudOptions{vms: true, timings: testTimings}
	if len(logger) > 0 {
		co.logger = logger[0]
	}
	x.cloud = startCloud(tb, env.Config, co)
	id := x.cloud.admit(tb, node)
	dir := dataDir(tb, node)
	images, err := vm.OpenImages(filepath.Join(dir, "vm-images"), "")
	require.NoError(tb, err)
	vmguest.Import(tb, images)
	x.images = images
	x.runDir = vmguest.RunDir(tb)
	x.logDir = filepath.Join(tb.TempDir(), "logs")
	mounts := map[int64]string{}
	if hugetlbfs != "" {
		mounts[resources.Hugepage2Mi] = hugetlbfs
	}
	x.edge = startEdge(tb, id, dir, x.cloud.addr, edgeOptions{timings: testTimings, configure: func(cfg *edgeapp.Config) {
		cfg.CRI = edgeapp.CRIConfig{
			Listen: filepath.Join(x.runDir, "cri.sock"), Containerd: ctr.Endpoint(),
			VM: &edgeapp.VMConfig{RunDir: x.runDir, Accel: vmguest.Accel(tb)},
		}
		cfg.Pods = pods.Config{LogDir: x.logDir}
		cfg.Resources = &resources.Config{HugepageMounts: mounts}
		if len(logger) > 0 {
			cfg.Logger = logger[0]
		}
	}})
	waitRegistered(tb, x.cs, x.cloud, node)
	return x
}

// waitBooted waits for VM name to be Running with the boot marker in its
// console, and returns it.
func (x *vmSite) waitBooted(t *testing.T, name string) *cloudvm.VirtualMachine {
	t.Helper()
	var v *cloudvm.VirtualMachine
	if !assert.Eventually(t, func() bool {
		got, err := x.vms.Get(context.Background(), x.ns, name)
		if err == nil {
			v = got
		}
		return err == nil && got.Status.Phase == cloudvm.PhaseRunning && strings.Contains(got.Status.Console, vm.BootMarker)
	}, 4*time.Minute, 100*time.Millisecond) {
		require.NotNil(t, v, "the VM was never read")
		t.Fatalf("the VM did not boot; its last status: %+v", v.Status)
	}
	return v
}

// keepConsole opens the console of the site's one VM and returns a path
// that reads it until the test ends: the pod's log directory goes with
// the pod, and the powerdown is read after.
func (x *vmSite) keepConsole(t *testing.T) string {
	t.Helper()
	logs, err := filepath.Glob(filepath.Join(x.logDir, "*", "compute_0.log"))
	require.NoError(t, err)
	require.Len(t, logs, 1)
	f, err := os.Open(logs[0])
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Close() })
	return fmt.Sprintf("/proc/self/fd/%d", f.Fd())
}

// requireNothingLeft waits for the node to hold no VM: no allocation
// rows, no sandbox directory (overlay, QMP socket), HugePages_Free back
// to free.
func (x *vmSite) requireNothingLeft(t *testing.T, free int64) {
	t.Helper()
	require.Eventually(t, func() bool {
		all, err := x.edge.st.Allocations().Kind(context.Background(), "")
		return err == nil && len(all) == 0
	}, 2*time.Minute, 100*time.Millisecond, "no allocation rows left")
	require.Eventually(t, func() bool {
		ents, err := os.ReadDir(x.runDir)
		if err != nil {
			return false
		}
		for _, d := range ents {
			if d.IsDir() {
				return false // a sandbox's directory: its overlay
			}
		}
		return true
	}, time.Minute, 100*time.Millisecond, "no overlay left")
	require.Eventually(t, func() bool { return hugepages.Free(t) >= free }, time.Minute, 50*time.Millisecond, "the pages come back")
}

// TestVMEndToEnd: a VirtualMachine created in the API server boots a real
// QEMU (TCG here) on an edge node, through CloudCore's VM controller, the
// tunnel, EdgeCore's store, pod manager, in-process CRI shim, VM backend
// and resource pool. The VM asks for 2Mi hugepages and a dedicated CPU:
// its status shows Running, the boot time, the acceleration and the boot
// marker in the console tail; HugePages_Free drops by its 64 pages; its
// vCPU thread runs on its granted core alone. Then the cloud goes away:
// the guest keeps running, and running:false set while the cloud is gone
// takes effect when it is back (the controller deletes the pod, the edge
// powers the guest down gracefully): the VM is Stopped, no QEMU, no
// overlay, no allocation rows, the pages free again. The test reserves the
// pages and mounts hugetlbfs itself, and undoes both.
func TestVMEndToEnd(t *testing.T) {
	mnt := hugepages.Reserve(t, 64+8) // before the edge starts: the Node advertises them
	x := startVMSite(t, "vm-e2e", mnt)
	ns, vms, c, e, node := x.ns, x.vms, x.cloud, x.edge, x.node
	ctx := klog.NewContext(t.Context(), logr.Discard())
	free := hugepages.Free(t)

	_, err := vms.Create(ctx, &cloudvm.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "guest"},
		Spec: cloudvm.Spec{Image: vmguest.ImageName, VCPUs: 1, Memory: "128Mi", HugepageSize: "2Mi",
			DedicatedCPUs: true, NodeName: node},
	})
	require.NoError(t, err)
	v := x.waitBooted(t, "guest")
	require.NotNil(t, v.Status.BootTime)
	require.Equal(t, vmguest.Accel(t), v.Status.Acceleration)
	require.Equal(t, node, v.Status.NodeName)

	require.LessOrEqual(t, hugepages.Free(t), free-64, "the guest's 128Mi come from hugepages")
	sb, pid := vmcheck.TheVM(ctx, t, e.st.Allocations())
	g, ok, err := e.app.Pool().Lookup(ctx, sb)
	require.NoError(t, err)
	require.True(t, ok)
	require.Len(t, g.CPUs, 1)
	vmcheck.RequirePinned(t, pid, g)

	console := x.keepConsole(t)

	// Offline: the cloud goes; the guest does not.
	c.stop()
	require.Eventually(t, func() bool {
		n, err := promtest.Value(e.reg, "tether_tunnel_sessions_active", nil)
		return err == nil && n == 0
	}, time.Minute, 50*time.Millisecond, "the edge sees the cloud gone")
	v, err = vms.Get(ctx, ns, "guest")
	require.NoError(t, err)
	v.Spec.Running = new(false)
	_, err = vms.Update(ctx, v)
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(pid, 0), "the guest runs on while the cloud is away")
	_, p2 := vmcheck.TheVM(ctx, t, e.st.Allocations())
	require.Equal(t, pid, p2)

	// Back: the controller acts on running:false, the edge hears it.
	startCloud(t, x.api, cloudOptions{vms: true, timings: testTimings, quicAddr: c.addr})
	require.Eventually(t, func() bool {
		v, err = vms.Get(context.Background(), ns, "guest")
		return err == nil && v.Status.Phase == cloudvm.PhaseStopped
	}, 3*time.Minute, 100*time.Millisecond, "running:false set offline stops the VM on reconnect")
	require.Eventually(t, func() bool { return syscall.Kill(pid, 0) == syscall.ESRCH }, time.Minute, 50*time.Millisecond, "QEMU exits")
	require.Equal(t, 1, vmguest.CountMarker(console, "TETHER-GUEST-POWERDOWN"), "a graceful powerdown, not a kill")
	x.requireNothingLeft(t, free)

	require.NoError(t, vms.Delete(ctx, ns, "guest"))
	require.Eventually(t, func() bool {
		_, err := vms.Get(context.Background(), ns, "guest")
		return apierrors.IsNotFound(err)
	}, time.Minute, 100*time.Millisecond)
}
