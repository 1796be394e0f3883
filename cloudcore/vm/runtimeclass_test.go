package vm

import (
	"testing"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestRuntimeClassManifest: build/runtimeclass-vm.yaml decodes strictly,
// names the class and handler the controller and the edge use, applies to
// the real API server, and its scheduling reaches a VM pod that a
// scheduler places (a nodeSelector VM): the RuntimeClass admission plugin
// merges the edge label in, and the pod waits unbound.
func TestRuntimeClassManifest(t *testing.T) {
	rc := readRuntimeClass(t)
	require.Equal(t, RuntimeClassName, rc.Name)
	require.Equal(t, "tether-vm", rc.Handler)
	require.Nil(t, rc.Overhead, "the controller adds QEMU's overhead to the pod itself; a RuntimeClass overhead would count it twice")

	c := newClients(t)
	installRuntimeClass(t, c)
	_, err := c.kube.NodeV1().RuntimeClasses().Create(t.Context(), rc, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	require.Error(t, err, "already there: installed from the file")
	got, err := c.kube.NodeV1().RuntimeClasses().Get(t.Context(), RuntimeClassName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, rc.Handler, got.Handler)
	require.Equal(t, rc.Scheduling, got.Scheduling)

	start(t, c, Config{})
	v := validVM(c.ns, "placed")
	v.Spec.NodeName, v.Spec.NodeSelector = "", map[string]string{"site": "shop-17"}
	_, err = c.vms.Create(t.Context(), v)
	require.NoError(t, err)
	pod := c.waitPod(t, "placed", "")
	require.Empty(t, pod.Spec.NodeName)
	require.Equal(t, map[string]string{"site": "shop-17", "node-role.tether.dev/edge": ""}, pod.Spec.NodeSelector)
	v = c.waitVM(t, "placed", func(v *VirtualMachine) bool { return v.Status.Reason == ReasonUnscheduled })
	require.Equal(t, PhasePending, v.Status.Phase)
	require.Equal(t, "vm-placed", v.Status.PodName)
}
