package dispatch

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/tunnel"
)

// observed returns a histogram's sample count and sum.
func observed(t *testing.T, h prometheus.Histogram) (count uint64, sum float64) {
	t.Helper()
	var m dto.Metric
	require.NoError(t, h.Write(&m))
	return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
}

// TestServeAcksPending: the gauge is the messages sent and not yet acked
// over the sessions, falls as acks arrive and returns to 0 when the
// session ends with messages unacked.
func TestServeAcksPending(t *testing.T) {
	r := newRig(t, Config{}, &fakeUpstream{}, nil, tunnel.Options{})
	for i := range 3 {
		r.cat.put(pod(i), "1", []byte(`{}`))
	}
	pending := func() float64 { return testutil.ToFloat64(r.d.metrics.acksPending) }
	require.Zero(t, pending())
	r.sendSync(t, emptyDigest())
	var events []uint64
	for len(events) < 3 {
		if m := r.recv(t); m.Kind == message.KindEvent {
			events = append(events, m.ID)
		}
	}
	require.Eventually(t, func() bool { return pending() == 3 }, 10*time.Second, 5*time.Millisecond, "three objects await their acks")
	r.send(t, &message.Message{Kind: message.KindAck, ReplyTo: events[0]})
	require.Eventually(t, func() bool { return pending() == 2 }, 10*time.Second, 5*time.Millisecond, "an ack takes one off")
	require.NoError(t, r.edge.Close("test done"))
	require.Eventually(t, func() bool { return pending() == 0 }, 10*time.Second, 5*time.Millisecond, "an ended session's messages no longer count")
}

// TestServeReconcileSizeAndDuration: every reconcile observes its
// duration once, at Done, and its size: objects missing or at another
// version at the edge plus the objects pruned, not the ones in sync.
func TestServeReconcileSizeAndDuration(t *testing.T) {
	r := newRig(t, Config{}, &fakeUpstream{}, nil, tunnel.Options{})
	m := r.d.metrics
	// The cloud wants five pods; the edge holds two of them at the
	// cloud's version, one at an older one, and four it no longer wants.
	e := edgeSim{}
	for i := range 5 {
		r.cat.put(pod(i), "2", []byte(`{}`))
	}
	e[pod(0)], e[pod(1)], e[pod(2)] = "2", "2", "1"
	for i := 10; i < 14; i++ {
		e[pod(i)] = "1"
	}
	d := e.digest()
	r.sendSync(t, d)
	want := syncOf(t, r.recv(t))
	require.Equal(t, objsync.PhaseWant, want.Phase)
	r.sendSync(t, e.list(want.Buckets, len(d.Buckets)))
	untilDone := func() {
		for {
			got := r.recv(t)
			if got.Kind == message.KindSync && syncOf(t, got).Phase == objsync.PhaseDone {
				return
			}
			if got.Kind == message.KindEvent || syncOf(t, got).Phase == objsync.PhasePrune {
				r.send(t, &message.Message{Kind: message.KindAck, ReplyTo: got.ID})
			}
		}
	}
	untilDone()
	// Done is sent before it is observed: wait for the observation.
	require.Eventually(t, func() bool { n, _ := observed(t, m.reconcileObjects); return n == 1 }, 10*time.Second, 5*time.Millisecond)
	_, size := observed(t, m.reconcileObjects)
	require.Equal(t, 1.0+2+4, size, "one stale, two missing, four pruned")
	n, secs := observed(t, m.reconcileSeconds)
	require.Equal(t, uint64(1), n)
	require.Greater(t, secs, 0.0)

	// A second reconcile of an empty edge: all five are missing.
	r.sendSync(t, emptyDigest())
	untilDone()
	require.Eventually(t, func() bool { n, _ := observed(t, m.reconcileObjects); return n == 2 }, 10*time.Second, 5*time.Millisecond)
	_, size = observed(t, m.reconcileObjects)
	require.Equal(t, 7.0+5, size)
	n, _ = observed(t, m.reconcileSeconds)
	require.Equal(t, uint64(2), n)
}
