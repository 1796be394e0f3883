package app_test

import (
	"context"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/hugepages"
	"github.com/tetheredge/tether/tests/vmcheck"
	"github.com/tetheredge/tether/tests/vmguest"
)

// A VM pod with dedicated CPUs and 2Mi hugepages through EdgeCore's
// wiring with a resource pool (Config.Resources): the backend gets its
// core and its hugetlbfs mount from the pool, the vCPU thread runs on the
// granted core alone and the emulator threads on the shared set, the
// guest's RAM comes out of HugePages_Free. EdgeCore stopped and started
// again on the same store adopts the QEMU and finds the same grant
// (Lookup, rows unchanged, the held core not given again). Deleting the
// pod gives everything back: no rows, no QEMU, the pages free again.
func TestVMPoolDedicatedCPUsAndHugepages(t *testing.T) {
	h := containerd.Start(t)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 5*time.Minute)
	defer cancel()
	mnt := hugepages.Reserve(t, 64+8) // the guest's 128Mi and a little more
	cfg := config(t)
	images, err := vm.OpenImages(filepath.Join(cfg.DataDir, "vm-images"), "")
	require.NoError(t, err)
	vmguest.Import(t, images)
	runDir := vmguest.RunDir(t)
	cfg.CRI = app.CRIConfig{
		Listen: filepath.Join(runDir, "cri.sock"), Containerd: h.Endpoint(),
		VM: &app.VMConfig{RunDir: runDir, Accel: vmguest.Accel(t)},
	}
	cfg.Pods = pods.Config{LogDir: filepath.Join(t.TempDir(), "logs")}
	cfg.Resources = &resources.Config{HugepageMounts: map[int64]string{resources.Hugepage2Mi: mnt}}
	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	closed := false
	defer func() {
		if !closed {
			require.NoError(t, a.Close())
		}
	}()
	free := hugepages.Free(t)
	pod := vmPod("pinned")
	pod.Annotations[vm.AnnotationDedicatedCPUs] = "true"
	pod.Annotations[vm.AnnotationHugepageSize] = "2Mi"
	putPod(ctx, t, a, pod)
	stop := run(ctx, t, a)
	booted := func(a *app.App) {
		require.Eventually(t, func() bool {
			st, ok := podStatus(ctx, a, string(pod.UID))
			c := podCondition(st, pods.ConditionGuestBooted)
			return ok && st.Phase == corev1.PodRunning && c != nil && c.Status == corev1.ConditionTrue
		}, 3*time.Minute, 100*time.Millisecond, "Running with GuestBooted")
	}
	booted(a)

	sb, pid := vmcheck.TheVM(ctx, t, a.Store().Allocations())
	g, ok, err := a.Pool().Lookup(ctx, sb)
	require.NoError(t, err)
	require.True(t, ok, "the pool holds the VM's grant")
	require.Len(t, g.CPUs, 1)
	require.NotContains(t, g.SharedCPUs, g.CPUs[0])
	require.Equal(t, mnt, g.HugepageDir)
	vmcheck.RequirePinned(t, pid, g)
	require.LessOrEqual(t, hugepages.Free(t), free-64, "the guest's 128Mi come from hugepages")
	rows := poolRows(ctx, t, a, sb)
	require.NotEmpty(t, rows)

	// EdgeCore goes and comes back on the same store: the VM backend
	// leaves QEMU running, the new one adopts it.
	stop()
	require.NoError(t, a.Close())
	closed = true
	a, err = app.New(ctx, cfg)
	require.NoError(t, err)
	closed = false
	stop = run(ctx, t, a)
	defer stop()
	sb2, pid2 := vmcheck.TheVM(ctx, t, a.Store().Allocations())
	require.Equal(t, sb, sb2)
	require.Equal(t, pid, pid2, "the QEMU was adopted, not restarted")
	g2, ok, err := a.Pool().Lookup(ctx, sb)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, g, g2, "the same grant after the restart")
	require.Equal(t, rows, poolRows(ctx, t, a, sb), "the allocation rows are unchanged")
	_, err = a.Pool().Allocate(ctx, resources.Request{Owner: "other", DedicatedCPUs: len(g.CPUs) + len(g.SharedCPUs)})
	require.ErrorIs(t, err, resources.ErrInsufficient, "the VM's core is not given twice")
	vmcheck.RequirePinned(t, pid, g)

	deleteAndWaitReleased(ctx, t, a, pod)
	_, ok, err = a.Pool().Lookup(ctx, sb)
	require.NoError(t, err)
	require.False(t, ok)
	require.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "no QEMU left")
	require.Eventually(t, func() bool { return hugepages.Free(t) >= free }, time.Minute, 50*time.Millisecond,
		"the pages come back")
}

// poolRows are owner's rows other than the VM record.
func poolRows(ctx context.Context, t *testing.T, a *app.App, owner string) []store.Allocation {
	t.Helper()
	rows, err := a.Store().Allocations().Owner(ctx, owner)
	require.NoError(t, err)
	var out []store.Allocation
	for _, r := range rows {
		if r.Kind != vm.KindVM {
			out = append(out, r)
		}
	}
	return out
}

// deleteAndWaitReleased deletes pod from a's store as the cloud's sync
// would and waits until no allocation row is left.
func deleteAndWaitReleased(ctx context.Context, t *testing.T, a *app.App, pod *corev1.Pod) {
	t.Helper()
	require.NoError(t, a.Store().Apply(ctx, []store.Change{{Op: message.OpDelete, Object: store.Object{
		Resource: message.Resource{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name},
	}}}))
	require.Eventually(t, func() bool {
		all, err := a.Store().Allocations().Kind(ctx, "")
		return err == nil && len(all) == 0
	}, 2*time.Minute, 100*time.Millisecond, "the pod's allocation rows go with it")
}
