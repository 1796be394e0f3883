package edgenode_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tunnel"
)

var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

// writer runs a ConnectionWriter over the real API server, reading
// EdgeNodes with a Get (the whitelist's cache in CloudCore), until the
// test ends.
func writer(t *testing.T, c *edgenode.Client, start bool) (*edgenode.ConnectionWriter, *promtest.Registry, func()) {
	t.Helper()
	reg := promtest.NewRegistry()
	w, err := edgenode.NewConnectionWriter(c, edgenode.ConnectionWriterConfig{
		Replica: "cloud-a", Registerer: reg,
		Get: func(node string) (*edgenode.EdgeNode, bool) {
			e, err := c.Get(context.Background(), node)
			return e, err == nil
		},
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	run := func() { go func() { done <- w.Run(ctx) }() }
	t.Cleanup(func() {
		cancel()
		if start {
			require.NoError(t, <-done)
		}
	})
	if start {
		run()
	}
	return w, reg, func() { start = true; run() }
}

func createNode(t *testing.T, c *edgenode.Client) string {
	t.Helper()
	name := fmt.Sprintf("edge-conn-%x", rand.Uint32())
	_, err := c.Create(context.Background(), &edgenode.EdgeNode{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: edgenode.Spec{Allowed: true}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Delete(context.Background(), name) })
	return name
}

func client(t *testing.T) *edgenode.Client {
	dyn, err := dynamic.NewForConfig(cp.Env(t).Config)
	require.NoError(t, err)
	return edgenode.NewClient(dyn)
}

// Everything that happened to a node before the writer got to it is one
// write of the latest state: a session that started, reconciled and
// ended, and a newer one that started and reconciled.
func TestConnectionWriterCoalesces(t *testing.T) {
	c := client(t)
	node := createNode(t, c)
	w, reg, start := writer(t, c, false)
	at := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	w.Started(node, "s1", tunnel.TransportQUIC, &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 40001}, at)
	w.Held(node, "s1", 7)
	w.Ended(node, "s1")
	w.Started(node, "s2", tunnel.TransportWebSocket, &net.TCPAddr{IP: net.ParseIP("2001:db8::2"), Port: 40002}, at.Add(time.Minute))
	w.Held(node, "s2", 9)
	w.Held(node, "s1", 1) // a late word of the old session: ignored
	start()
	require.Eventually(t, func() bool {
		e, err := c.Get(context.Background(), node)
		return err == nil && e.Status.Connection != nil && e.Status.ObjectsHeld != nil && *e.Status.ObjectsHeld == 9
	}, 30*time.Second, 20*time.Millisecond)
	e, err := c.Get(context.Background(), node)
	require.NoError(t, err)
	conn := e.Status.Connection
	require.True(t, conn.Since.Equal(&metav1.Time{Time: at.Add(time.Minute)}), "since %s", conn.Since)
	conn.Since = metav1.Time{}
	require.Equal(t, &edgenode.Connection{Replica: "cloud-a", Transport: "websocket", RemoteAddr: "[2001:db8::2]:40002", Session: "s2"}, conn)
	requireWrites(t, reg, "ok", 1)
}

// requireWrites waits until tether_edgenode_status_writes_total{result}
// is n: a write is counted once it returned, a moment after the API
// server has it.
func requireWrites(t *testing.T, reg *promtest.Registry, result string, n float64) {
	t.Helper()
	require.Eventually(t, func() bool {
		v, err := promtest.Value(reg, "tether_edgenode_status_writes_total", map[string]string{"result": result})
		return err == nil && v == n
	}, 30*time.Second, 20*time.Millisecond, "writes %s", result)
}

// The end of a session clears the connection, keeps the count, and is
// written; the end of an older session, or of one another replica
// replaced, clears nothing.
func TestConnectionWriterEnd(t *testing.T) {
	c := client(t)
	node := createNode(t, c)
	w, reg, _ := writer(t, c, true)
	ok := func() float64 {
		return promtest.Sum(t, reg, "tether_edgenode_status_writes_total", map[string]string{"result": "ok"})
	}
	status := func() edgenode.Status {
		e, err := c.Get(context.Background(), node)
		require.NoError(t, err)
		return e.Status
	}
	at := time.Now()
	w.Started(node, "s1", tunnel.TransportQUIC, nil, at)
	w.Held(node, "s1", 3)
	require.Eventually(t, func() bool { s := status(); return s.Connection != nil && s.ObjectsHeld != nil }, 30*time.Second, 20*time.Millisecond)
	w.Ended(node, "s1")
	require.Eventually(t, func() bool { return status().Connection == nil }, 30*time.Second, 20*time.Millisecond)
	require.Equal(t, int64(3), *status().ObjectsHeld)

	// Another replica records a newer session; this one's old session
	// then ends: the other replica's record stays.
	w.Started(node, "s2", tunnel.TransportQUIC, nil, at)
	require.Eventually(t, func() bool { s := status(); return s.Connection != nil && s.Connection.Session == "s2" }, 30*time.Second, 20*time.Millisecond)
	e, err := c.Get(context.Background(), node)
	require.NoError(t, err)
	e.Status.Connection = &edgenode.Connection{Replica: "cloud-b", Transport: "websocket", Session: "b1", Since: metav1.NewTime(at.Add(time.Second))}
	_, err = c.UpdateStatus(context.Background(), e)
	require.NoError(t, err)
	before := ok()
	w.Ended(node, "s2")
	// A later event of another node is written after it (one queue, in
	// order), so once that one is, the end has been handled.
	other := createNode(t, c)
	w.Started(other, "o1", tunnel.TransportQUIC, nil, at)
	require.Eventually(t, func() bool { return ok() == before+1 }, 30*time.Second, 20*time.Millisecond)
	require.Equal(t, "cloud-b", status().Connection.Replica)
}

// The connection is recorded with lastConnected in one write over the
// writer's (cached) read. When another writer changed the status since
// that read (the race that once lost the whitelist's separate record of
// lastConnected), the write conflicts and is retried from a fresh read:
// the other writer's change and the whole connection record are kept.
func TestRecordConnected(t *testing.T) {
	c := client(t)
	ctx := context.Background()
	name := createNode(t, c)
	stale, err := c.Get(ctx, name)
	require.NoError(t, err)
	fresh := *stale
	fresh.Status.Certificate = &edgenode.Certificate{Serial: "c1", NotAfter: metav1.NewTime(time.Now().Add(time.Hour))}
	_, err = c.UpdateStatus(ctx, &fresh)
	require.NoError(t, err)

	reg := promtest.NewRegistry()
	var reads atomic.Int32
	w, err := edgenode.NewConnectionWriter(c, edgenode.ConnectionWriterConfig{
		Replica: "cloud-a", Registerer: reg,
		Get: func(node string) (*edgenode.EdgeNode, bool) {
			if reads.Add(1) == 1 {
				e := *stale // a cache that has not seen the other write yet
				return &e, true
			}
			e, err := c.Get(context.Background(), node)
			return e, err == nil
		},
	})
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })

	at := time.Now().Truncate(time.Second)
	w.Started(name, "s1", tunnel.TransportQUIC, nil, at)
	require.Eventually(t, func() bool {
		e, err := c.Get(ctx, name)
		return err == nil && e.Status.Connection != nil
	}, 30*time.Second, 20*time.Millisecond)
	got, err := c.Get(ctx, name)
	require.NoError(t, err)
	require.Equal(t, "s1", got.Status.Connection.Session)
	require.NotNil(t, got.Status.LastConnected)
	require.True(t, at.Equal(got.Status.LastConnected.Time), "lastConnected %s, want %s", got.Status.LastConnected, at)
	require.NotNil(t, got.Status.Certificate, "the other writer's change is kept")
	require.Equal(t, "c1", got.Status.Certificate.Serial)
	require.Equal(t, 1.0, promtest.Sum(t, reg, "tether_edgenode_status_writes_total", map[string]string{"result": "conflict"}))
	requireWrites(t, reg, "ok", 1)

	// The session ends: the connection is cleared, lastConnected stays.
	w.Ended(name, "s1")
	require.Eventually(t, func() bool {
		e, err := c.Get(ctx, name)
		return err == nil && e.Status.Connection == nil
	}, 30*time.Second, 20*time.Millisecond)
	got, err = c.Get(ctx, name)
	require.NoError(t, err)
	require.NotNil(t, got.Status.LastConnected)
	require.True(t, at.Equal(got.Status.LastConnected.Time))
}
