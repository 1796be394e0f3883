package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/tests/promtest"
)

// TestRestartWritesNoNode is issue 10 §3's restart on the real wiring: an
// EdgeCore restarted on its store, on the real clock, whose Node the cloud
// already holds, writes no Node (its resourceVersion in the API server
// stays) and so receives none back; it renews its Lease. Before the fix
// every start registered again: a new heartbeat, a new resourceVersion,
// and the Node sent back down to the edge.
func TestRestartWritesNoNode(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	const node = "restart-1"
	createEdgeNode(t, cs, node)
	c := startCloud(t, env.Config, cloudOptions{})
	id := c.admit(t, node)
	dir := t.TempDir()
	opts := edgeOptions{nodeStatus: nodestatus.Config{Now: time.Now}}
	first := startEdge(t, id, dir, c.addr, opts)
	waitRegistered(t, cs, c, node)
	// The Node arrived at the edge at the version the API server has.
	n, err := cs.CoreV1().Nodes().Get(context.Background(), node, metav1.GetOptions{})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		o, ok, err := first.st.Get(context.Background(), objsync.Key{Kind: "Node", Name: node})
		return err == nil && ok && o.Version == n.ResourceVersion
	}, 30*time.Second, 10*time.Millisecond, "the edge holds its registered Node")
	require.Eventually(t, func() bool {
		pending, err := first.st.PendingCount(context.Background())
		return err == nil && pending == 0
	}, 30*time.Second, 10*time.Millisecond, "the first run's writes are answered")
	first.stop()
	// Two seconds on, a registration would carry another heartbeat (Node
	// times have second precision).
	since := time.Now()
	require.Eventually(t, func() bool { return time.Since(since) > 2*time.Second }, 10*time.Second, 50*time.Millisecond)

	second := startEdge(t, id, dir, c.addr, opts)
	acked := map[string]string{"result": "acked"}
	require.Zero(t, second.counter(t, "tether_edge_upstream_total", acked))
	require.Eventually(t, func() bool {
		pending, err := second.st.PendingCount(context.Background())
		n, _ := promtest.Value(second.reg, "tether_edge_upstream_total", acked)
		return err == nil && pending == 0 && n >= 1
	}, 30*time.Second, 10*time.Millisecond, "the restarted edge renewed its lease")
	// Its outbox is empty: its first lease renewal, and anything queued
	// before it (a registration at start would have been), is answered.
	after, err := cs.CoreV1().Nodes().Get(context.Background(), node, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, n.ResourceVersion, after.ResourceVersion, "the restart wrote the Node: conditions %+v, were %+v",
		after.Status.Conditions, n.Status.Conditions)
	require.Zero(t, second.applied(t), "an object came down to the restarted edge")
	require.Equal(t, 1.0, second.counter(t, "tether_edge_upstream_total", acked), "upstream writes of the restart: the lease only")
}
