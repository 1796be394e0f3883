package e2e

// Helpers of the offline autonomy tests (offline_test.go) that run a real
// kube-controller-manager.

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// createHealthyNode creates a Ready Node with no edge behind it.
func createHealthyNode(t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	n, err := cs.CoreV1().Nodes().Create(t.Context(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
	now := metav1.Now()
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: now, LastTransitionTime: now}}
	_, err = cs.CoreV1().Nodes().UpdateStatus(t.Context(), n, metav1.UpdateOptions{})
	require.NoError(t, err)
}

// renewEverySecond renews name's lease every second, as its kubelet would,
// until the returned function is called (it waits for the goroutine).
func renewEverySecond(t *testing.T, cs kubernetes.Interface, name string) func() {
	leases := cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	secs := int32(40)
	renew := func() {
		now := metav1.NewMicroTime(time.Now())
		patch, err := json.Marshal(map[string]any{"spec": map[string]any{"renewTime": now}})
		require.NoError(t, err)
		_, err = leases.Patch(context.Background(), name, types.MergePatchType, patch, metav1.PatchOptions{})
		if apierrors.IsNotFound(err) {
			_, err = leases.Create(context.Background(), &coordinationv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: corev1.NamespaceNodeLease},
				Spec:       coordinationv1.LeaseSpec{HolderIdentity: &name, LeaseDurationSeconds: &secs, RenewTime: &now},
			}, metav1.CreateOptions{})
		}
		if err != nil {
			t.Errorf("renew lease %s: %v", name, err)
		}
	}
	renew()
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				renew()
			}
		}
	}()
	return func() { close(stop); <-done }
}

// boundPod creates a pod bound to node; the apiserver gives it the 2 s
// default unreachable toleration.
func boundPod(t *testing.T, cs kubernetes.Interface, ns, node string) string {
	t.Helper()
	p, err := cs.CoreV1().Pods(ns).Create(t.Context(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "on-" + node, Namespace: ns},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "tether.local/busybox:1"}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	requireShortToleration(t, p)
	return p.Name
}

// requireShortToleration checks that the apiserver gave p the 2 s default
// unreachable toleration of tests/controlplane's controller manager setup.
func requireShortToleration(t *testing.T, p *corev1.Pod) {
	t.Helper()
	require.True(t, slices.ContainsFunc(p.Spec.Tolerations, func(tl corev1.Toleration) bool {
		return tl.Key == corev1.TaintNodeUnreachable && tl.TolerationSeconds != nil && *tl.TolerationSeconds == 2
	}), "the apiserver gives the pod the short default toleration: %+v", p.Spec.Tolerations)
}

func evicted(ctx context.Context, cs kubernetes.Interface, ns, pod string) bool {
	p, err := cs.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	return apierrors.IsNotFound(err) || (err == nil && p.DeletionTimestamp != nil)
}

func readyOf(n *corev1.Node) corev1.ConditionStatus {
	if c := conditionOf(n, corev1.NodeReady); c != nil {
		return c.Status
	}
	return ""
}

func unreachable(n *corev1.Node) bool {
	return slices.ContainsFunc(n.Spec.Taints, func(tt corev1.Taint) bool {
		return tt.Key == corev1.TaintNodeUnreachable && tt.Effect == corev1.TaintEffectNoExecute
	})
}

// conditionOf returns n's condition of type typ (nil: none, or no n).
func conditionOf(n *corev1.Node, typ corev1.NodeConditionType) *corev1.NodeCondition {
	if n == nil {
		return nil
	}
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}
