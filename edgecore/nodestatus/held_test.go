package nodestatus

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/store"
)

// holdNode stores n in st as the cloud sends the node its own Node, at
// resourceVersion rv.
func holdNode(t *testing.T, st *store.Store, n *corev1.Node, rv string) {
	t.Helper()
	data, err := json.Marshal(n)
	require.NoError(t, err)
	require.NoError(t, st.Apply(context.Background(), []store.Change{{Op: message.OpUpsert, Object: store.Object{
		Resource: message.Resource{Version: "v1", Kind: "Node", Name: n.Name, UID: "uid-" + n.Name}, Version: rv, Data: data,
	}}}))
}

// cloudCopy is the Node a reporter with cfg registers, as the cloud holds
// it after the registration: the edge label and a condition of its own
// added, quantities in the API server's canonical form.
func cloudCopy(t *testing.T, cfg Config) *corev1.Node {
	t.Helper()
	r, err := New(cfg, nil, nil)
	require.NoError(t, err)
	n := r.Node()
	n.Labels["node-role.tether.dev/edge"] = ""
	n.Status.Conditions = append(n.Status.Conditions, corev1.NodeCondition{Type: "TetherConnected", Status: corev1.ConditionTrue})
	for _, l := range []corev1.ResourceList{n.Status.Capacity, n.Status.Allocatable} {
		for k, q := range l {
			l[k] = *q.ToDec() // another form of the same value
		}
	}
	return n
}

// heldConfig is a reporter's config with Held set to st, its clock at now.
func heldConfig(st *store.Store, now time.Time) Config {
	return Config{
		Node: "edge-1", Labels: map[string]string{"site": "a"}, MemoryBytes: 1 << 30,
		LeaseDuration: time.Hour, StatusEvery: time.Hour, Now: func() time.Time { return now }, Held: st,
	}
}

// waitLease waits until the reporter's first lease renewal is in the
// outbox: it comes after any report Run makes at start.
func waitLease(t *testing.T, st *store.Store) map[string]store.OutboxItem {
	t.Helper()
	var k map[string]store.OutboxItem
	require.Eventually(t, func() bool { k = pendingKinds(st); return k["Lease"].Seq != 0 }, 10*time.Second, 5*time.Millisecond)
	return k
}

// startOnce runs a reporter on st (heldConfig at now) until its first
// lease renewal is queued, and returns the last Node it published.
func startOnce(t *testing.T, st *store.Store, now time.Time) (corev1.Node, message.Op, bool) {
	t.Helper()
	pub := &recorder{st: st}
	r, err := New(heldConfig(st, now), pub, nil)
	require.NoError(t, err)
	stop, _ := start(t, r)
	waitLease(t, st)
	require.NoError(t, stop())
	return pub.last()
}

// TestStartSkipsRegistrationTheCloudHolds is the restart half of issue 10
// §3: a start whose Node the cloud already holds (labels, capacity,
// allocatable, addresses, nodeInfo and Ready alike, heartbeat fresh)
// publishes no Node, only its lease (before: the registration at every
// start, which then came back down re-written). A held Node that lacks a
// label or says another status, or whose heartbeat is older than
// StatusEvery, gets the registration or a status report.
func TestStartSkipsRegistrationTheCloudHolds(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name   string
		edit   func(*corev1.Node)
		wantOp message.Op // 0: no Node published
	}{
		{"the cloud holds it", func(*corev1.Node) {}, 0},
		{"a label missing", func(n *corev1.Node) { delete(n.Labels, "site") }, message.OpUpsert},
		{"a label changed", func(n *corev1.Node) { n.Labels["site"] = "b" }, message.OpUpsert},
		{"Ready Unknown", func(n *corev1.Node) {
			n.Status.Conditions[0].Status, n.Status.Conditions[0].Reason = corev1.ConditionUnknown, "NodeStatusUnknown"
		}, message.OpUpsert},
		{"other capacity", func(n *corev1.Node) { n.Status.Capacity[corev1.ResourcePods] = list("pods", "1")[corev1.ResourcePods] }, message.OpUpsert},
		{"heartbeat stale", func(n *corev1.Node) {
			n.Status.Conditions[0].LastHeartbeatTime = metav1.NewTime(now.Add(-2 * time.Hour))
		}, message.OpStatus},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, _ := openStore(t)
			held := cloudCopy(t, heldConfig(nil, now.Add(-time.Minute)))
			tc.edit(held)
			holdNode(t, st, held, "7")
			n, op, ok := startOnce(t, st, now)
			if tc.wantOp == 0 {
				require.False(t, ok, "published %v %+v", op, n.Status.Conditions)
				return
			}
			require.True(t, ok, "no Node published")
			require.Equal(t, tc.wantOp, op)
			require.Equal(t, now.Unix(), readyOf(n).LastHeartbeatTime.Unix())
		})
	}
}

// TestStartKeepsHeldTransition: a restart whose Ready status is the held
// one dates the condition's transition as the cloud has it, not at the
// restart (kubelet keeps it the same way).
func TestStartKeepsHeldTransition(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	st, _ := openStore(t)
	held := cloudCopy(t, heldConfig(nil, now.Add(-3*time.Hour)))
	held.Status.Conditions[0].LastHeartbeatTime = metav1.NewTime(now.Add(-2 * time.Hour)) // stale: a report goes out
	holdNode(t, st, held, "7")
	n, _, ok := startOnce(t, st, now)
	require.True(t, ok)
	require.Equal(t, now.Add(-3*time.Hour).Unix(), readyOf(n).LastTransitionTime.Unix(), "the transition was re-dated")
}

// TestHeldNodeChangeReported: while running, a new version of the held
// Node that says another status (the node lifecycle controller set Ready
// Unknown while the edge was away) gets a status report at once, without
// waiting for StatusEvery; a new version that says the same (a condition
// of CloudCore's changed) gets none.
func TestHeldNodeChangeReported(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	st, _ := openStore(t)
	held := cloudCopy(t, heldConfig(nil, now))
	holdNode(t, st, held, "7")
	pub := &recorder{st: st}
	r, err := New(heldConfig(st, now), pub, nil)
	require.NoError(t, err)
	stop, _ := start(t, r)
	defer func() { require.NoError(t, stop()) }()
	waitLease(t, st)

	same := held.DeepCopy()
	same.Status.Conditions[1].Status = corev1.ConditionFalse
	holdNode(t, st, same, "8")
	unknown := held.DeepCopy()
	unknown.Status.Conditions[0].Status = corev1.ConditionUnknown
	holdNode(t, st, unknown, "9")
	require.Eventually(t, func() bool { _, _, ok := pub.last(); return ok }, 10*time.Second, 5*time.Millisecond, "no status report")
	n, op, _ := pub.last()
	require.Equal(t, message.OpStatus, op)
	require.Equal(t, corev1.ConditionTrue, readyOf(n).Status)
	pub.mu.Lock()
	defer pub.mu.Unlock()
	require.Len(t, pub.nodes, 1, "one report for the one Node that differed")
}
