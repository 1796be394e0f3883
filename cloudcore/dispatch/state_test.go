package dispatch

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/objsync"
)

// world is a desired state: key -> version string ("" = absent).
type world map[objsync.Key]string

func (w world) Keys() []objsync.Key {
	out := make([]objsync.Key, 0, len(w))
	for k := range w {
		out = append(out, k)
	}
	return out
}

func (w world) Lookup(k objsync.Key) (uint64, any, bool) {
	v, ok := w[k]
	if !ok {
		return 0, nil, false
	}
	return objsync.VersionHash("uid-"+k.Name, v), v, true
}

// edgeSim holds what an edge has committed and answers sync messages the
// way EdgeCore does.
type edgeSim map[objsync.Key]string

func (e edgeSim) entries() []objsync.Entry {
	var out []objsync.Entry
	for k, v := range e {
		out = append(out, objsync.Entry{Key: k.Hash(), Version: objsync.VersionHash("uid-"+k.Name, v)})
	}
	return out
}

func (e edgeSim) digest() objsync.Sync {
	ent := e.entries()
	d := objsync.NewDigest(objsync.BucketCount(len(ent)))
	for _, x := range ent {
		d.Add(x)
	}
	return objsync.Sync{Phase: objsync.PhaseDigest, Count: uint32(len(ent)), Buckets: d.Buckets}
}

func (e edgeSim) list(want []uint64, nb int) objsync.Sync {
	w := map[int]bool{}
	for _, b := range want {
		w[int(b)] = true
	}
	var out []objsync.Entry
	for _, x := range e.entries() {
		if w[objsync.Bucket(x.Key, nb)] {
			out = append(out, x)
		}
	}
	return objsync.Sync{Phase: objsync.PhaseList, Entries: out}
}

// apply commits the actions and returns the ids to ack.
func (e edgeSim) apply(actions []Action) (acks []uint64, sent int) {
	for _, a := range actions {
		switch a.Kind {
		case SendObject:
			e[a.Key] = a.Object.(string)
			sent++
		case SendDelete:
			delete(e, a.Key)
			sent++
		case SendPrune:
			for _, h := range a.Hashes {
				for k := range e {
					if k.Hash() == h {
						delete(e, k)
					}
				}
			}
			sent += len(a.Hashes)
		case SendDone, SendWant:
			continue
		}
		acks = append(acks, a.ID)
	}
	return acks, sent
}

func pod(i int) objsync.Key {
	return objsync.Key{Kind: "Pod", Namespace: "default", Name: fmt.Sprintf("p-%04d", i)}
}

// reconnect runs the whole reconcile plus the flow until quiet, and
// returns how many object messages crossed.
func reconnect(t *testing.T, n *Node, w world, e edgeSim) int {
	t.Helper()
	now := time.Unix(0, 0)
	d := e.digest()
	actions := n.OnDigest(d, w)
	if len(actions) == 1 && actions[0].Kind == SendWant {
		var err error
		actions, err = n.OnList(e.list(actions[0].Buckets, len(d.Buckets)), w)
		require.NoError(t, err)
	}
	total := 0
	for range 10_000 {
		acks, sent := e.apply(actions)
		total += sent
		for _, id := range acks {
			n.OnAck(id)
		}
		actions = n.Next(now, w)
		if len(actions) == 0 && n.InFlight() == 0 {
			break
		}
	}
	require.Zero(t, n.Queued())
	return total
}

func TestReconcileSendsOnlyDifferences(t *testing.T) {
	w := world{}
	for i := range 1000 {
		w[pod(i)] = "1"
	}
	e := edgeSim{}
	// First connection: an empty edge receives everything.
	require.Equal(t, 1000, reconnect(t, NewNode(Config{}), w, e))
	require.Equal(t, edgeSim(w), e)

	// Reconnect with nothing changed: nothing crosses.
	require.Equal(t, 0, reconnect(t, NewNode(Config{}), w, e))

	// Offline: update 10, delete 5, create 5.
	for i := range 10 {
		w[pod(i*50)] = "2"
	}
	for i := range 5 {
		delete(w, pod(i*50+1))
		w[pod(2000+i)] = "1"
	}
	sent := reconnect(t, NewNode(Config{}), w, e)
	require.Equal(t, 20, sent, "10 updates + 5 creates + 5 prunes")
	require.Equal(t, edgeSim(w), e)
}

func TestWindowAndOneInFlightPerKey(t *testing.T) {
	w := world{}
	for i := range 1000 {
		w[pod(i)] = "1"
	}
	n := NewNode(Config{Window: 100})
	e := edgeSim{}
	n.OnDigest(e.digest(), w)
	now := time.Unix(0, 0)
	a := n.Next(now, w)
	require.Len(t, a, 100, "window bounds what is in flight")
	require.Empty(t, n.Next(now, w), "window full")

	// The first key changes twice while its message is in flight: nothing
	// more is sent for it until the ack, then only the newest version.
	first := a[0]
	w[first.Key] = "2"
	n.Changed(first.Key)
	w[first.Key] = "3"
	n.Changed(first.Key)
	for _, x := range a {
		n.OnAck(x.ID)
	}
	var forFirst []Action
	for range 100 {
		next := n.Next(now, w)
		if len(next) == 0 {
			break
		}
		for _, x := range next {
			if x.Key == first.Key {
				forFirst = append(forFirst, x)
			}
			n.OnAck(x.ID)
		}
	}
	require.Len(t, forFirst, 1, "one more message for the key, after the ack")
	require.Equal(t, "3", forFirst[0].Object, "carrying the newest version")
}

func TestResendAfterTimeoutAndIgnoreUnknownAcks(t *testing.T) {
	w := world{pod(1): "1"}
	n := NewNode(Config{ResendAfter: time.Second})
	n.OnDigest(edgeSim{}.digest(), w)
	t0 := time.Unix(100, 0)
	a := n.Next(t0, w)
	require.Len(t, a, 1)
	n.OnAck(9999) // unknown: ignored
	n.Tick(t0.Add(500 * time.Millisecond))
	require.Empty(t, n.Next(t0.Add(500*time.Millisecond), w))
	n.Tick(t0.Add(2 * time.Second))
	b := n.Next(t0.Add(2*time.Second), w)
	require.Len(t, b, 1)
	require.NotEqual(t, a[0].ID, b[0].ID)
	n.OnAck(a[0].ID) // the late ack of the first send changes nothing
	require.Equal(t, 1, n.InFlight())
	n.OnAck(b[0].ID)
	require.Equal(t, 0, n.InFlight())
	require.Empty(t, n.Next(t0.Add(3*time.Second), w), "acked: in sync")
}

func TestDeleteAndRefuse(t *testing.T) {
	w := world{pod(1): "1", pod(2): "1"}
	e := edgeSim{}
	n := NewNode(Config{})
	reconnectLive(t, n, w, e)
	delete(w, pod(1))
	n.Changed(pod(1))
	a := n.Next(time.Now(), w)
	require.Len(t, a, 1)
	require.Equal(t, SendDelete, a[0].Kind)
	n.OnRefused(a[0].ID)
	require.Equal(t, 0, n.InFlight())
	require.Empty(t, n.Next(time.Now(), w), "a refused key waits for its next change")
}

func reconnectLive(t *testing.T, n *Node, w world, e edgeSim) {
	t.Helper()
	n.OnDigest(e.digest(), w)
	for {
		a := n.Next(time.Now(), w)
		if len(a) == 0 {
			return
		}
		acks, _ := e.apply(a)
		for _, id := range acks {
			n.OnAck(id)
		}
	}
}

func TestNothingSentBeforeReconcile(t *testing.T) {
	w := world{pod(1): "1"}
	n := NewNode(Config{})
	n.Changed(pod(1))
	require.Empty(t, n.Next(time.Now(), w))
	require.False(t, n.Live())
	e := edgeSim{pod(1): "0", pod(9): "1"}
	a := n.OnDigest(e.digest(), w)
	require.Equal(t, SendWant, a[0].Kind)
	require.Empty(t, n.Next(time.Now(), w), "still waiting for the list")
	live := NewNode(Config{})
	live.OnDigest(edgeSim{}.digest(), world{})
	a, err := live.OnList(objsync.Sync{Phase: objsync.PhaseList}, w)
	require.ErrorIs(t, err, ErrUnexpectedList, "a list nobody asked for is refused")
	require.Nil(t, a, "and changes nothing")
}
