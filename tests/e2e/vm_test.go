package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"

	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/cloudcore/vm"
)

// TestVMControllerWired: CloudCore as cloudcore/app wires it runs the
// VirtualMachine controller behind its Lease in CloudCore's namespace: a
// VirtualMachine gets its pod and a status, and a stopped CloudCore
// releases the Lease. (What the controller does is tested in
// cloudcore/vm; the VM's path through the edge is issue 9's.)
func TestVMControllerWired(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ensureRuntimeClass(t, cs)
	dyn, err := dynamic.NewForConfig(env.Config)
	require.NoError(t, err)
	vms := vm.NewClient(dyn)

	c := startCloud(t, env.Config, cloudOptions{vms: true})
	_, err = vms.Create(t.Context(), &vm.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "wired"},
		Spec:       vm.Spec{Image: "tether-guest", VCPUs: 1, Memory: "128Mi", NodeName: "vm-wired-node"},
	})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		v, err := vms.Get(context.Background(), ns, "wired")
		return err == nil && v.Status.Phase == vm.PhaseScheduled && v.Status.PodName == vm.PodName("wired")
	}, 60*time.Second, 50*time.Millisecond, "the VM gets its pod and a status")
	pod, err := cs.CoreV1().Pods(ns).Get(t.Context(), vm.PodName("wired"), metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, "vm-wired-node", pod.Spec.NodeName)
	require.Equal(t, vm.RuntimeClassName, *pod.Spec.RuntimeClassName)

	leases := cs.CoordinationV1().Leases(onboard.DefaultCANamespace)
	l, err := leases.Get(t.Context(), vm.DefaultLeaseName, metav1.GetOptions{})
	require.NoError(t, err)
	require.NotEmpty(t, *l.Spec.HolderIdentity)
	c.stop()
	require.Eventually(t, func() bool {
		l, err := leases.Get(context.Background(), vm.DefaultLeaseName, metav1.GetOptions{})
		return err == nil && (l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity == "")
	}, 30*time.Second, 50*time.Millisecond, "a stopped CloudCore releases the Lease")
	require.NoError(t, cs.CoreV1().Pods(ns).Delete(t.Context(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))}))
}
