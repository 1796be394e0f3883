package e2e

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/testlog"
)

// publishOffline writes upstream items into an edge's outbox while the edge
// is not connected, as EdgeCore does when the cloud is unreachable.
func publishOffline(t *testing.T, path string, items ...store.OutboxItem) {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, path, testlog.New())
	require.NoError(t, err)
	sy, err := syncer.New(st, syncer.Config{}, testlog.New(), nil)
	require.NoError(t, err)
	for _, it := range items {
		require.NoError(t, sy.Publish(ctx, it))
	}
	require.NoError(t, st.Close())
}

func podStatusItem(t *testing.T, ns, name string, phase corev1.PodPhase) store.OutboxItem {
	b, err := json.Marshal(corev1.PodStatus{Phase: phase, Message: "from the edge"})
	require.NoError(t, err)
	return store.OutboxItem{Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: ns, Name: name}, Data: b}
}

// TestUpstreamWhileOffline: a new node's registration and lease queued
// while offline reach the API server when it connects, and the node is
// labelled an edge by the cloud; pod status written at the edge while
// offline reaches the API server after the next reconnect, newest per
// object; writes for another node's objects are refused and not written.
//
// The pod status waits for the second start because a status for a pod of
// a node the cloud does not know as an edge yet is refused for good, and
// EdgeCore queues its registration anew, behind what is queued, at every
// start.
func TestUpstreamWhileOffline(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	otherNode := uniqueNode("edge-other")
	createEdgeNode(t, cs, otherNode)
	createPods(t, cs, ns, "up", "edge-u", 0, 2)
	createPods(t, cs, ns, "other", otherNode, 0, 1)
	t.Cleanup(func() { _ = cs.CoreV1().Nodes().Delete(context.Background(), "edge-u", metav1.DeleteOptions{}) })

	dir := dataDir(t, "edge-u")
	status := nodestatus.Config{Node: "edge-u", Labels: map[string]string{"site": "shop-17"}, MemoryBytes: 4 << 30}
	rep, err := nodestatus.New(status, nil, testlog.New())
	require.NoError(t, err)
	nodeJSON, err := json.Marshal(rep.Node())
	require.NoError(t, err)
	leaseJSON := []byte(`{"spec":{"holderIdentity":"edge-u","leaseDurationSeconds":40,"renewTime":"2026-11-22T04:00:00.000000Z"}}`)
	c := startCloud(t, env.Config, cloudOptions{timings: testTimings})
	id := c.admit(t, "edge-u")
	opts := edgeOptions{timings: testTimings, nodeStatus: status}
	drained := func(e *edge) {
		t.Helper()
		require.Eventually(t, func() bool {
			n, err := e.st.PendingCount(ctx)
			return err == nil && n == 0
		}, 30*time.Second, 50*time.Millisecond, "the outbox drains: written items are acked, forged ones refused")
	}

	// A new node, offline: its registration and lease, and forgeries, wait
	// in the outbox.
	publishOffline(t, storePath(dir),
		store.OutboxItem{Op: message.OpUpsert, Resource: message.Resource{Version: "v1", Kind: "Node", Name: "edge-u"}, Data: nodeJSON},
		store.OutboxItem{Op: message.OpUpsert, Resource: message.Resource{Group: "coordination.k8s.io", Version: "v1", Kind: "Lease", Namespace: "kube-node-lease", Name: "edge-u"}, Data: leaseJSON},
		store.OutboxItem{Op: message.OpUpsert, Resource: message.Resource{Group: "coordination.k8s.io", Version: "v1", Kind: "Lease", Namespace: "kube-node-lease", Name: otherNode}, Data: leaseJSON}, // forged
		store.OutboxItem{Op: message.OpUpsert, Resource: message.Resource{Version: "v1", Kind: "Node", Name: otherNode}, Data: nodeJSON},                                                               // forged
	)
	e := startEdge(t, id, dir, c.addr, opts)
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, "edge-u", metav1.GetOptions{})
		if err != nil {
			return false
		}
		_, edge := n.Labels["node-role.tether.dev/edge"]
		mem := n.Status.Capacity[corev1.ResourceMemory]
		return edge && n.Labels["site"] == "shop-17" && mem.Value() == 4<<30
	}, 30*time.Second, 50*time.Millisecond, "the edge registers its Node, labelled as an edge by the cloud")
	drained(e)
	waitRegistered(t, cs, c, "edge-u")
	e.stop()

	// Offline again, now a known edge node: pod status for its pods, and
	// for another node's.
	publishOffline(t, storePath(dir),
		podStatusItem(t, ns, "up-0000", corev1.PodPending),
		podStatusItem(t, ns, "up-0000", corev1.PodRunning), // newer status for the same pod wins
		podStatusItem(t, ns, "up-0001", corev1.PodFailed),
		podStatusItem(t, ns, "other-0000", corev1.PodSucceeded), // forged: bound to another node
	)
	e = startEdge(t, id, dir, c.addr, opts)
	require.Eventually(t, func() bool {
		p0, err0 := cs.CoreV1().Pods(ns).Get(ctx, "up-0000", metav1.GetOptions{})
		p1, err1 := cs.CoreV1().Pods(ns).Get(ctx, "up-0001", metav1.GetOptions{})
		return err0 == nil && err1 == nil && p0.Status.Phase == corev1.PodRunning && p1.Status.Phase == corev1.PodFailed
	}, 30*time.Second, 50*time.Millisecond, "offline pod status reaches the API server")
	drained(e)

	require.Equal(t, 3.0, c.counter(t, "tether_upstream_writes_total", map[string]string{"result": "forbidden"}))
	lease, err := cs.CoordinationV1().Leases("kube-node-lease").Get(ctx, "edge-u", metav1.GetOptions{})
	require.NoError(t, err, "the heartbeat lease is written")
	require.Equal(t, "edge-u", *lease.Spec.HolderIdentity)
	_, err = cs.CoordinationV1().Leases("kube-node-lease").Get(ctx, otherNode, metav1.GetOptions{})
	require.Error(t, err, "a node cannot write another node's lease")
	other, err := cs.CoreV1().Pods(ns).Get(ctx, "other-0000", metav1.GetOptions{})
	require.NoError(t, err)
	require.NotEqual(t, corev1.PodSucceeded, other.Status.Phase, "a forged status is not written")
	nb, err := cs.CoreV1().Nodes().Get(ctx, otherNode, metav1.GetOptions{})
	require.NoError(t, err)
	require.NotEqual(t, "shop-17", nb.Labels["site"], "a node cannot rewrite another node")
	// The edge received its own Node (registered by itself) and its pods.
	waitConverged(t, c.cat, e.st, "edge-u", 3)
}
