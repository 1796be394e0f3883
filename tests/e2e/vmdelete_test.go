package e2e

import (
	"context"
	"log/slog"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"

	cloudvm "github.com/tetheredge/tether/cloudcore/vm"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qemu"
	"github.com/tetheredge/tether/tests/hugepages"
	"github.com/tetheredge/tether/tests/vmcheck"
	"github.com/tetheredge/tether/tests/vmguest"
)

// TestVMDeletedWhileRunning: a VirtualMachine deleted from the API server
// while its guest runs (no running:false first). The controller deletes
// the pod with its grace period; the edge powers the guest down by ACPI
// and the guest's acpid answers (its powerdown marker on the console, the
// backend's "vm stopped" record says powerdown, within the grace period,
// not quit or kill); the pod goes from the API server; nothing is left on
// the node: no QEMU, no VM directory (overlay, QMP socket), no allocation
// rows, the hugepages free again. The test reserves the pages and mounts
// hugetlbfs itself, and undoes both.
func TestVMDeletedWhileRunning(t *testing.T) {
	mnt := hugepages.Reserve(t, 64+8) // before the edge starts: the Node advertises them
	mk := newMarks("vm stopped")
	x := startVMSite(t, "vm-delete", mnt, slog.New(mk))
	ctx := klog.NewContext(t.Context(), logr.Discard())
	free := hugepages.Free(t)

	_, err := x.vms.Create(ctx, &cloudvm.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Namespace: x.ns, Name: "doomed"},
		Spec: cloudvm.Spec{Image: vmguest.ImageName, VCPUs: 1, Memory: "128Mi", HugepageSize: "2Mi",
			NodeName: x.node},
	})
	require.NoError(t, err)
	x.waitBooted(t, "doomed")
	require.LessOrEqual(t, hugepages.Free(t), free-64, "the guest's 128Mi come from hugepages")
	sb, pid := vmcheck.TheVM(ctx, t, x.edge.st.Allocations())
	pod, err := x.cs.CoreV1().Pods(x.ns).Get(ctx, cloudvm.PodName("doomed"), metav1.GetOptions{})
	require.NoError(t, err)
	grace := 30 * time.Second // the API server's default
	if g := pod.Spec.TerminationGracePeriodSeconds; g != nil {
		grace = time.Duration(*g) * time.Second
	}

	console := x.keepConsole(t)
	require.Zero(t, vmguest.CountMarker(console, "TETHER-GUEST-POWERDOWN"))

	deleted := time.Now()
	require.NoError(t, x.vms.Delete(ctx, x.ns, "doomed"))
	require.Eventually(t, func() bool {
		_, err := x.cs.CoreV1().Pods(x.ns).Get(context.Background(), pod.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}, 3*time.Minute, 100*time.Millisecond, "the VM's pod goes")
	require.Eventually(t, func() bool {
		_, err := x.vms.Get(context.Background(), x.ns, "doomed")
		return apierrors.IsNotFound(err)
	}, time.Minute, 100*time.Millisecond, "the VM goes")
	require.Eventually(t, func() bool { return syscall.Kill(pid, 0) == syscall.ESRCH }, time.Minute, 50*time.Millisecond, "QEMU exits")
	require.Equal(t, 1, vmguest.CountMarker(console, "TETHER-GUEST-POWERDOWN"), "the guest's acpid saw the power button")
	stopped := mk.find(t, "vm stopped", "sandbox", sb)
	require.Equal(t, string(qemu.EndedPowerdown), stopped.attrs["ending"].String(), "the guest powered off within the grace period, not quit or killed after it")
	require.Equal(t, grace, stopped.attrs["grace"].Duration(), "stopped with the pod's grace period")
	t.Logf("VM deleted -> its QEMU stopped by powerdown: %v (grace %v)", stopped.at.Sub(deleted), grace)

	x.requireNothingLeft(t, free)
}
