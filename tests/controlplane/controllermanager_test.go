package controlplane

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// TestControllerManagerNodeLifecycle shows the real node lifecycle and
// taint eviction controllers at work with the accelerated timers: of two
// Ready nodes, the one whose lease is no longer renewed turns Unknown, is
// tainted node.kubernetes.io/unreachable (NoExecute), and its pod (given
// the apiserver's 2 s default toleration) is evicted; the other, whose
// lease a goroutine renews every second, stays Ready and untainted. A second
// healthy node is needed: with every node of the zone NotReady the
// controller enters full disruption and taints nothing.
func TestControllerManagerNodeLifecycle(t *testing.T) {
	env := Start(t, WithControllerManager(ControllerManager{}))
	cs, err := kubernetes.NewForConfig(env.Config)
	require.NoError(t, err)
	ctx := t.Context()
	ns := env.Namespace(t)

	healthy, lost := "cm-healthy", "cm-lost"
	for _, name := range []string{healthy, lost} {
		createReadyNode(t, cs, name)
		renewLease(t, cs, name)
	}
	pod, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "on-lost", Namespace: ns},
		Spec:       corev1.PodSpec{NodeName: lost, Containers: []corev1.Container{{Name: "c", Image: "tether.local/busybox:1"}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	require.True(t, slices.ContainsFunc(pod.Spec.Tolerations, func(tl corev1.Toleration) bool {
		return tl.Key == corev1.TaintNodeUnreachable && tl.TolerationSeconds != nil && *tl.TolerationSeconds == 2
	}), "the apiserver gives the pod the short default toleration: %+v", pod.Spec.Tolerations)

	// Keep the healthy node's lease fresh, as its kubelet would.
	stop := make(chan struct{})
	renewed := make(chan struct{})
	go func() {
		defer close(renewed)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				renewLease(t, cs, healthy)
			}
		}
	}()
	defer func() { close(stop); <-renewed }()

	begin := time.Now()
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, lost, metav1.GetOptions{})
		return err == nil && readyStatus(n) == corev1.ConditionUnknown && hasTaint(n, corev1.TaintNodeUnreachable)
	}, 60*time.Second, 100*time.Millisecond, "the lost node turns Unknown and is tainted unreachable\n%s", env.cm.tail())
	t.Logf("lost node Unknown and tainted %s after its last renewal", time.Since(begin).Round(100*time.Millisecond))

	require.Eventually(t, func() bool {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err) || (err == nil && p.DeletionTimestamp != nil)
	}, 30*time.Second, 100*time.Millisecond, "the taint eviction controller evicts the pod on the lost node")
	t.Logf("pod evicted %s after the lost node's last renewal", time.Since(begin).Round(100*time.Millisecond))

	n, err := cs.CoreV1().Nodes().Get(ctx, healthy, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, corev1.ConditionTrue, readyStatus(n), "the renewed node stays Ready")
	require.False(t, hasTaint(n, corev1.TaintNodeUnreachable) || hasTaint(n, corev1.TaintNodeNotReady), "the renewed node is not tainted: %+v", n.Spec.Taints)
}

// TestControllerManagerMissing: asking for a controller manager that has not
// been built fails with ErrBinariesMissing, naming make testbin.
func TestControllerManagerMissing(t *testing.T) {
	dir := t.TempDir()
	p, err := findPaths(false)
	require.NoError(t, err)
	for _, bin := range []string{p.apiServer, p.etcd} {
		require.NoError(t, os.Symlink(bin, filepath.Join(dir, filepath.Base(bin))))
	}
	t.Setenv(testbinEnv, dir)
	_, err = findPaths(false)
	require.NoError(t, err, "without a controller manager, kube-apiserver and etcd suffice")
	_, err = New(WithControllerManager(ControllerManager{}))
	require.ErrorIs(t, err, ErrBinariesMissing)
	require.ErrorContains(t, err, "kube-controller-manager")
}

func createReadyNode(t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	ctx := t.Context()
	n, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		_ = cs.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{})
	})
	now := metav1.Now()
	n.Status.Conditions = []corev1.NodeCondition{{
		Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: now, LastTransitionTime: now,
	}}
	_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
	require.NoError(t, err)
}

// renewLease creates or renews name's lease in kube-node-lease.
func renewLease(t *testing.T, cs kubernetes.Interface, name string) {
	ctx := context.Background()
	leases := cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	l, err := leases.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		secs := int32(40)
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: corev1.NamespaceNodeLease},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &name, LeaseDurationSeconds: &secs, RenewTime: &now},
		}, metav1.CreateOptions{})
	} else if err == nil {
		l.Spec.RenewTime = &now
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	}
	if err != nil {
		t.Errorf("renew lease %s: %v", name, err)
	}
}

func readyStatus(n *corev1.Node) corev1.ConditionStatus {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status
		}
	}
	return ""
}

func hasTaint(n *corev1.Node, key string) bool {
	return slices.ContainsFunc(n.Spec.Taints, func(tt corev1.Taint) bool { return tt.Key == key && tt.Effect == corev1.TaintEffectNoExecute })
}
