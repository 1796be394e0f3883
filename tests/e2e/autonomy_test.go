package e2e

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/autonomy"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/tests/controlplane"
)

// autonomyHold is how long the test watches an offline edge node to show
// that nothing happens to it: well past the controller manager's 5 s node
// monitor grace period plus the pods' 2 s toleration, by which the
// baseline's node is tainted and its pod evicted. Waiting it out is the
// point, not a synchronisation.
const autonomyHold = 20 * time.Second

// TestOfflineAutonomy runs a real kube-controller-manager (node lifecycle
// and taint eviction, accelerated timers) over two edge nodes, each with a
// pod, and a third, plain Node whose lease the test renews (with every
// node of the zone NotReady the controller would evict nothing, which
// would prove nothing). Edge A's CloudCore has offline autonomy off: when
// A stops, its node turns Unknown, is tainted unreachable and its pod is
// evicted, the baseline. Edge B's CloudCore has it on: when B stops,
// CloudCore renews B's lease, so for autonomyHold B stays Ready and
// untainted, its pod stays, and B's TetherConnected condition says the
// site is offline; when B comes back the condition says so.
func TestOfflineAutonomy(t *testing.T) {
	env := controlplane.Start(t, controlplane.WithControllerManager(controlplane.ControllerManager{}))
	cs := adminClient(t, env.Config)
	ctx := t.Context()
	ns := env.Namespace(t)

	healthy := "autonomy-healthy"
	createHealthyNode(t, cs, healthy)
	stopRenew := renewEverySecond(t, cs, healthy)
	defer stopRenew()

	ls := nodestatus.Config{LeaseDuration: 4 * time.Second, Now: time.Now}
	off := startCloud(t, env.Config, cloudOptions{timings: testTimings})
	on := startCloud(t, env.Config, cloudOptions{timings: testTimings, offlineAutonomy: time.Hour})
	idA, idB := off.admit(t, "autonomy-a"), on.admit(t, "autonomy-b")
	dirB := dataDir(t, idB.node)
	edgeA := startEdge(t, idA, dataDir(t, idA.node), off.addr, edgeOptions{timings: testTimings, nodeStatus: ls})
	edgeB := startEdge(t, idB, dirB, on.addr, edgeOptions{timings: testTimings, nodeStatus: ls})
	waitRegistered(t, cs, off, idA.node)
	waitRegistered(t, cs, on, idB.node)
	zones := map[string]bool{}
	for _, name := range []string{healthy, idA.node, idB.node} {
		n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		zones[n.Labels[corev1.LabelTopologyZone]+"/"+n.Labels[corev1.LabelTopologyRegion]] = true
	}
	require.Len(t, zones, 1, "the three nodes are in one zone, so the healthy one keeps the zone out of full disruption")
	podA, podB := boundPod(t, cs, ns, idA.node), boundPod(t, cs, ns, idB.node)

	// Baseline: no autonomy.
	edgeA.stop()
	begin := time.Now()
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, idA.node, metav1.GetOptions{})
		return err == nil && readyOf(n) == corev1.ConditionUnknown && unreachable(n)
	}, 30*time.Second, 100*time.Millisecond, "without autonomy the lost edge turns Unknown and is tainted unreachable")
	t.Logf("baseline: edge node Unknown and tainted %s after its EdgeCore stopped", time.Since(begin).Round(100*time.Millisecond))
	require.Eventually(t, func() bool { return evicted(ctx, cs, ns, podA) }, 30*time.Second, 100*time.Millisecond,
		"without autonomy the pod on the lost edge is evicted")
	t.Logf("baseline: its pod evicted %s after its EdgeCore stopped", time.Since(begin).Round(100*time.Millisecond))

	// With autonomy.
	edgeB.stop()
	begin = time.Now()
	require.Eventually(t, func() bool {
		c := connectedCondition(ctx, cs, idB.node)
		return c != nil && c.Status == corev1.ConditionFalse && c.Reason == autonomy.ReasonDisconnected
	}, 10*time.Second, 100*time.Millisecond, "the offline edge's Node says TetherConnected False")
	t.Logf("autonomy: TetherConnected=False %s after EdgeCore stopped", time.Since(begin).Round(100*time.Millisecond))
	// Waiting out autonomyHold is the test: nothing may happen in it.
	var what string
	if !assert.Never(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, idB.node, metav1.GetOptions{})
		switch {
		case err != nil:
			what = err.Error()
		case readyOf(n) != corev1.ConditionTrue:
			what = "the offline edge is not Ready"
		case slices.ContainsFunc(n.Spec.Taints, func(tt corev1.Taint) bool {
			return tt.Key == corev1.TaintNodeUnreachable || tt.Key == corev1.TaintNodeNotReady
		}):
			what = "the offline edge is tainted"
		case evicted(ctx, cs, ns, podB):
			what = "the pod on the offline edge is evicted"
		default:
			return false
		}
		return true
	}, autonomyHold, 200*time.Millisecond) {
		t.Fatalf("with offline autonomy nothing may happen to an offline edge, but after %s: %s", time.Since(begin).Round(100*time.Millisecond), what)
	}
	t.Logf("autonomy: edge node Ready, untainted and its pod in place %s after its EdgeCore stopped", time.Since(begin).Round(100*time.Millisecond))
	require.Positive(t, on.counter(t, "tether_autonomy_lease_renewals_total", nil), "CloudCore renewed the lease")

	startEdge(t, idB, dirB, on.addr, edgeOptions{timings: testTimings, nodeStatus: ls})
	begin = time.Now()
	require.Eventually(t, func() bool {
		return slices.Contains(on.app.Connected(), idB.node)
	}, 10*time.Second, 50*time.Millisecond, "edge B reconnects")
	// CloudCore writes TetherConnected True once it sees the session; the
	// edge's own status reports replace the Node's conditions (a JSON
	// merge patch), so after one of them the condition is absent, which
	// also means connected.
	var back *corev1.NodeCondition
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, idB.node, metav1.GetOptions{})
		if err != nil {
			return false
		}
		back = conditionOf(n, autonomy.ConditionType)
		return back == nil || (back.Status == corev1.ConditionTrue && back.Reason == autonomy.ReasonConnected)
	}, 10*time.Second, 50*time.Millisecond, "the Node no longer says TetherConnected False")
	state := "absent"
	if back != nil {
		state = string(back.Status) + "/" + back.Reason
	}
	t.Logf("autonomy: TetherConnected %s %s after EdgeCore started again", state, time.Since(begin).Round(100*time.Millisecond))
	require.False(t, evicted(ctx, cs, ns, podB))
}

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
	require.True(t, slices.ContainsFunc(p.Spec.Tolerations, func(tl corev1.Toleration) bool {
		return tl.Key == corev1.TaintNodeUnreachable && tl.TolerationSeconds != nil && *tl.TolerationSeconds == 2
	}), "the apiserver gives the pod the short default toleration: %+v", p.Spec.Tolerations)
	return p.Name
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

func connectedCondition(ctx context.Context, cs kubernetes.Interface, node string) *corev1.NodeCondition {
	n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	return conditionOf(n, autonomy.ConditionType)
}

func conditionOf(n *corev1.Node, typ corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}
