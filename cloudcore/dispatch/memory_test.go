package dispatch

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestIdleNodeLetsEmptiedMapsGo: once a reconcile and a burst of changes
// are acked, the state machine holds only what the edge holds: the maps
// of queued, in-flight, unsure and pruned messages are let go (a Go map
// keeps its memory when emptied: about 2 KiB per idle session in
// CloudCore's heap profile before). Changes afterwards flow as before.
func TestIdleNodeLetsEmptiedMapsGo(t *testing.T) {
	w := world{}
	for i := range 100 {
		w[pod(i)] = "1"
	}
	e := edgeSim{}
	n := NewNode(Config{})
	require.Equal(t, 100, reconnect(t, n, w, e))
	requireReleased := func() {
		t.Helper()
		require.Nil(t, n.queued)
		require.Nil(t, n.inflight)
		require.Nil(t, n.byID)
		require.Nil(t, n.prunes)
		require.Nil(t, n.unsure)
		require.Len(t, n.edge, 100)
	}
	requireReleased()

	// A burst of changes, one of them resent after a timeout (unsure),
	// then acked: released again, and the edge has every change.
	now := time.Unix(0, 0)
	for i := range 10 {
		w[pod(i)] = "2"
		n.Changed(pod(i))
	}
	actions := n.Next(now, w)
	require.Len(t, actions, 10)
	n.Tick(now.Add(DefaultResendAfter)) // every message is forgotten and requeued
	actions = n.Next(now.Add(DefaultResendAfter), w)
	require.Len(t, actions, 10)
	acks, _ := e.apply(actions)
	for _, id := range acks {
		n.OnAck(id)
	}
	require.Empty(t, n.Next(now, w))
	requireReleased()
	require.Equal(t, edgeSim(w), e)

	b := &inbox{signal: make(chan struct{}, 1)}
	b.add(pod(1))
	b.add(pod(1))
	require.Equal(t, 1, len(b.drain()))
	require.Nil(t, b.keys)
	require.Empty(t, b.drain())
}
