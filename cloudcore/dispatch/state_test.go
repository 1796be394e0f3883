package dispatch

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
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

// subDigest is the digest of an edge that takes sub-buckets.
func (e edgeSim) subDigest() objsync.Sync {
	d := e.digest()
	d.Caps = objsync.CapSubBuckets
	return d
}

// answer lists what a want asks for, the way EdgeCore does: whole buckets,
// or only the sub-buckets whose digest differs from the want's, named.
func (e edgeSim) answer(want Action, nb int) objsync.Sync {
	if len(want.Sub) == 0 {
		return e.list(want.Buckets, nb)
	}
	sd := objsync.NewSubDigest(nb, len(want.Sub)/len(want.Buckets), want.Buckets)
	for _, x := range e.entries() {
		sd.Add(x)
	}
	subs := sd.Diff(want.Sub)
	var out []objsync.Entry
	for _, x := range e.entries() {
		if slices.Contains(subs, sd.Sub(x.Key)) {
			out = append(out, x)
		}
	}
	return objsync.Sync{Phase: objsync.PhaseList, Entries: out, Buckets: subs, Caps: objsync.CapSubBuckets}
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
	sent, _ := reconnectWith(t, n, w, e, e.digest())
	return sent
}

// reconnectWith is reconnect from digest d, and also returns the entries
// the edge listed.
func reconnectWith(t *testing.T, n *Node, w world, e edgeSim, d objsync.Sync) (sent, listed int) {
	t.Helper()
	now := time.Unix(0, 0)
	actions := n.OnDigest(d, w)
	if len(actions) == 1 && actions[0].Kind == SendWant {
		if d.Caps&objsync.CapSubBuckets == 0 {
			require.Nil(t, actions[0].Sub, "no sub-digests for an edge that does not take them")
		}
		l := e.answer(actions[0], len(d.Buckets))
		require.NoError(t, l.Validate())
		listed = len(l.Entries)
		var err error
		actions, err = n.OnList(l, w)
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
	return total, listed
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

// staleEdge is an edge that follows the protocol's rule for stale
// messages: per key hash it remembers the id of the last event or prune it
// applied, and acks a message with a lower id without applying it.
type staleEdge struct {
	objs  edgeSim
	last  map[uint64]uint64
	stale int
}

func newStaleEdge() *staleEdge { return &staleEdge{objs: edgeSim{}, last: map[uint64]uint64{}} }

// deliver applies one message as it arrives and returns the id to ack.
func (e *staleEdge) deliver(a Action) uint64 {
	switch a.Kind {
	case SendObject, SendDelete:
		h := a.Key.Hash()
		if a.ID < e.last[h] {
			e.stale++
			return a.ID
		}
		e.last[h] = a.ID
		if a.Kind == SendObject {
			e.objs[a.Key] = a.Object.(string)
		} else {
			delete(e.objs, a.Key)
		}
	case SendPrune:
		for _, h := range a.Hashes {
			for k := range e.objs {
				if k.Hash() == h {
					delete(e.objs, k)
					e.last[h] = a.ID
				}
			}
		}
	case SendWant, SendDone:
		return 0
	}
	return a.ID
}

// requireIncreasing checks that the actions' ids strictly increase,
// continuing from *last.
func requireIncreasing(t *testing.T, last *uint64, actions []Action) {
	t.Helper()
	for _, a := range actions {
		require.Greater(t, a.ID, *last, "ids strictly increase within a session")
		*last = a.ID
	}
}

func TestIDsIncreaseAcrossResendsAndDigests(t *testing.T) {
	w := world{}
	for i := range 5 {
		w[pod(i)] = "1"
	}
	n := NewNode(Config{ResendAfter: time.Second})
	var last uint64
	t0 := time.Unix(100, 0)
	requireIncreasing(t, &last, n.OnDigest(edgeSim{}.digest(), w))
	first := n.Next(t0, w)
	require.Len(t, first, 5)
	requireIncreasing(t, &last, first)

	// Nothing acked: every key is sent again, each under a new, higher id.
	n.Tick(t0.Add(2 * time.Second))
	resent := n.Next(t0.Add(2*time.Second), w)
	require.Len(t, resent, 5)
	requireIncreasing(t, &last, resent)
	n.OnAck(first[0].ID)
	require.Equal(t, 5, n.InFlight(), "the ack of a forgotten id changes nothing")

	// A second digest in the same session starts over, ids go on.
	e := edgeSim{pod(0): "1", pod(9): "1"}
	d := e.digest()
	a := n.OnDigest(d, w)
	require.Equal(t, 0, n.InFlight(), "a new digest forgets the old flights")
	requireIncreasing(t, &last, a)
	require.Equal(t, SendWant, a[0].Kind)
	a, err := n.OnList(e.list(a[0].Buckets, len(d.Buckets)), w)
	require.NoError(t, err)
	requireIncreasing(t, &last, a)
	requireIncreasing(t, &last, n.Next(t0.Add(3*time.Second), w))
}

func TestDeleteAfterSlowLargeSendOutranksIt(t *testing.T) {
	big := objsync.Key{Kind: "Secret", Namespace: "default", Name: "big"}
	w := world{big: "1"}
	n := NewNode(Config{ResendAfter: 10 * time.Second})
	e := newStaleEdge()
	n.OnDigest(e.objs.digest(), w)
	t0 := time.Unix(100, 0)
	send := n.Next(t0, w)
	require.Len(t, send, 1)
	require.Equal(t, SendObject, send[0].Kind)
	// The large message is slow (its own QUIC stream); the cloud resends
	// it, then the Secret is deleted while both are still on the way.
	n.Tick(t0.Add(10 * time.Second))
	resend := n.Next(t0.Add(10*time.Second), w)
	require.Len(t, resend, 1)
	delete(w, big)
	n.Changed(big)
	require.Empty(t, n.Next(t0.Add(11*time.Second), w), "one message per key awaits an ack")
	n.Tick(t0.Add(20 * time.Second))
	del := n.Next(t0.Add(20*time.Second), w)
	require.Len(t, del, 1)
	require.Equal(t, SendDelete, del[0].Kind)
	require.Greater(t, del[0].ID, resend[0].ID)
	require.Greater(t, resend[0].ID, send[0].ID)

	// The small delete arrives first, the two large sends after it.
	for _, a := range []Action{del[0], send[0], resend[0]} {
		n.OnAck(e.deliver(a))
	}
	require.Empty(t, e.objs, "the deleted Secret does not come back")
	require.Equal(t, 2, e.stale)
	require.Equal(t, 0, n.InFlight())
	require.Empty(t, n.Next(t0.Add(21*time.Second), w), "the cloud knows the edge holds nothing")
}

// listChunks splits a list the way the edge does: at most max entries
// each, More on all but the last.
func listChunks(l objsync.Sync, max int) []objsync.Sync {
	var out []objsync.Sync
	for c := range slices.Chunk(l.Entries, max) {
		out = append(out, objsync.Sync{Phase: objsync.PhaseList, Entries: c, More: true})
	}
	if len(out) == 0 {
		return []objsync.Sync{{Phase: objsync.PhaseList}}
	}
	out[len(out)-1].More = false
	return out
}

// reconcileSplit runs a reconcile whose lists the edge splits at max and
// returns the cloud's answer to the last one, checking that earlier ones
// get none.
func reconcileSplit(t *testing.T, n *Node, w world, e edgeSim, max int) []Action {
	t.Helper()
	d := e.digest()
	a := n.OnDigest(d, w)
	require.Len(t, a, 1)
	require.Equal(t, SendWant, a[0].Kind)
	chunks := listChunks(e.list(a[0].Buckets, len(d.Buckets)), max)
	require.Greater(t, len(chunks), 1, "the test needs a split list")
	for i, c := range chunks {
		require.NoError(t, c.Validate())
		a, err := n.OnList(c, w)
		require.NoError(t, err)
		if i < len(chunks)-1 {
			require.Empty(t, a, "nothing happens before the last list")
			require.False(t, n.Live())
			continue
		}
		return a
	}
	return nil
}

func TestSplitListsAndPrunes(t *testing.T) {
	w := world{}
	e := newStaleEdge()
	for i := range 35 {
		e.objs[pod(i)] = "1"
		if i < 5 {
			w[pod(i)] = "2"
		}
	}
	n := NewNode(Config{MaxEntries: 10})
	a := reconcileSplit(t, n, w, e.objs, 10)
	var last uint64
	requireIncreasing(t, &last, a)
	require.Len(t, a, 4, "30 hashes in prunes of 10, then done")
	for _, p := range a[:3] {
		require.Equal(t, SendPrune, p.Kind)
		require.Len(t, p.Hashes, 10)
	}
	require.Equal(t, SendDone, a[3].Kind)
	for _, x := range a {
		if id := e.deliver(x); id != 0 {
			n.OnAck(id)
		}
	}
	require.Len(t, e.objs, 5)
	for {
		next := n.Next(time.Now(), w)
		if len(next) == 0 {
			break
		}
		requireIncreasing(t, &last, next)
		for _, x := range next {
			n.OnAck(e.deliver(x))
		}
	}
	require.Equal(t, edgeSim(w), e.objs)
	require.Equal(t, 0, n.InFlight(), "every prune acked")
}

func TestSplitAtRealMaxEntries(t *testing.T) {
	codec := message.NewCodec(0)
	e := edgeSim{}
	for i := range objsync.MaxEntries + 5 {
		e[objsync.Key{Kind: "Pod", Namespace: "default", Name: fmt.Sprintf("p-%06d", i)}] = "1"
	}
	n := NewNode(Config{})
	a := reconcileSplit(t, n, world{}, e, objsync.MaxEntries)
	require.Len(t, a, 3)
	total := 0
	for _, p := range a[:2] {
		require.Equal(t, SendPrune, p.Kind)
		s := objsync.Sync{Phase: objsync.PhasePrune, Hashes: p.Hashes}
		require.NoError(t, s.Validate(), "each prune is one the edge accepts")
		b, err := codec.Append(nil, &s)
		require.NoError(t, err)
		require.Less(t, len(b), message.DefaultMaxFrame, "and fits in a frame")
		t.Logf("prune of %d hashes: %d bytes", len(p.Hashes), len(b))
		total += len(p.Hashes)
	}
	require.Equal(t, objsync.MaxEntries+5, total)
	require.Equal(t, SendDone, a[2].Kind)
	require.True(t, n.Live())
}

func TestListBounds(t *testing.T) {
	e := edgeSim{pod(1): "1", pod(2): "1", pod(3): "1"}
	n := NewNode(Config{MaxEntries: 10})
	w := world{}
	a := n.OnDigest(e.digest(), w)
	require.Equal(t, SendWant, a[0].Kind)
	// The digest announced 3 objects: lists may hold 3+10 entries.
	junk := make([]objsync.Entry, 7)
	for i := range junk {
		junk[i] = objsync.Entry{Key: uint64(i), Version: 1}
	}
	_, err := n.OnList(objsync.Sync{Phase: objsync.PhaseList, Entries: junk, More: true}, w)
	require.NoError(t, err)
	_, err = n.OnList(objsync.Sync{Phase: objsync.PhaseList, Entries: junk, More: true}, w)
	require.ErrorIs(t, err, ErrListTooLong)
	require.False(t, n.Live())
	_, err = n.OnList(objsync.Sync{Phase: objsync.PhaseList}, w)
	require.ErrorIs(t, err, ErrUnexpectedList, "the reconcile is abandoned")
	require.Empty(t, n.Next(time.Now(), w))

	// A new digest starts a fresh reconcile.
	w[pod(1)] = "1"
	a = reconcileSplit(t, n, w, e, 1)
	require.Equal(t, SendPrune, a[0].Kind)
	require.Len(t, a[0].Hashes, 2)
}

// The size a reconcile reports at Done is what it then sends and prunes:
// objects missing or stale at the edge plus the hashes pruned, not the
// objects already in sync.
func TestReconcileReportsItsSize(t *testing.T) {
	w := world{}
	for i := range 300 {
		w[pod(i)] = "1"
	}
	for _, tc := range []struct {
		name string
		edge func() edgeSim
		want int
	}{
		{"in sync", func() edgeSim {
			e := edgeSim{}
			for k, v := range w {
				e[k] = v
			}
			return e
		}, 0},
		{"empty edge", func() edgeSim { return edgeSim{} }, 300},
		{"stale, missing and extra", func() edgeSim {
			e := edgeSim{}
			for i := range 290 { // 10 missing
				e[pod(i)] = "1"
			}
			for i := range 5 { // 5 stale
				e[pod(i)] = "0"
			}
			for i := 1000; i < 1007; i++ { // 7 extra
				e[pod(i)] = "1"
			}
			return e
		}, 10 + 5 + 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := NewNode(Config{})
			e := tc.edge()
			d := e.digest()
			actions := n.OnDigest(d, w)
			if actions[0].Kind == SendWant {
				var err error
				actions, err = n.OnList(e.list(actions[0].Buckets, len(d.Buckets)), w)
				require.NoError(t, err)
			}
			done := actions[len(actions)-1]
			require.Equal(t, SendDone, done.Kind)
			require.Equal(t, tc.want, done.Differences)
			before := len(e)
			sent := 0 // objects, deletes and pruned hashes
			for range 10_000 {
				acks, s := e.apply(actions)
				sent += s
				for _, id := range acks {
					n.OnAck(id)
				}
				actions = n.Next(time.Unix(0, 0), w)
				if len(actions) == 0 && n.InFlight() == 0 {
					break
				}
			}
			require.Equal(t, done.Differences, sent, "the size is what crossed (edge held %d)", before)
		})
	}
}

// An edge that takes sub-buckets lists only the sub-buckets that differ,
// and a reconcile with it ends exactly where one with an edge that does
// not (listing whole buckets) ends: the same objects sent, the same
// pruned, the edge holding what it must. 400 objects with 5 changed is the
// benchmark's case (BenchmarkReconnect400): 32 buckets of about 12.
func TestSubBucketsListOnlyWhatDiffers(t *testing.T) {
	for _, tc := range []struct {
		name                     string
		objects, changed, extras int
	}{
		{"400 objects, 5 changed", 400, 5, 0},
		{"400 objects, 5 changed, 3 created, 4 to prune", 400, 5, 4},
		{"10000 objects, 10 changed", 10_000, 10, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := world{}
			held := edgeSim{}
			for i := range tc.objects {
				w[pod(i)] = "1"
				held[pod(i)] = "1"
			}
			for i := range tc.changed {
				w[pod(i*37)] = "2"
			}
			for i := range tc.extras {
				delete(w, pod(i*41+1)) // the edge holds it: pruned
			}
			for i := range tc.extras - 1 {
				w[pod(tc.objects+i)] = "1" // the edge lacks it
			}
			var sent, listed [2]int
			for i, caps := range []bool{false, true} {
				e := maps.Clone(held)
				d := e.digest()
				if caps {
					d = e.subDigest()
				}
				sent[i], listed[i] = reconnectWith(t, NewNode(Config{}), w, e, d)
				require.Equal(t, edgeSim(w), e, "caps %v: the edge holds exactly what it must", caps)
			}
			require.Equal(t, sent[0], sent[1], "the same objects cross either way")
			require.Equal(t, tc.changed+tc.extras+max(tc.extras-1, 0), sent[1], "changed, pruned and created")
			t.Logf("entries listed: %d whole buckets, %d by sub-bucket", listed[0], listed[1])
			require.LessOrEqual(t, 3*listed[1], listed[0], "sub-buckets list at most a third of the entries")
		})
	}
}

// Random differences of every kind, both kinds of edge: every reconcile
// ends with the edge holding exactly the desired state.
func TestSubBucketsRandomDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		w, e := world{}, edgeSim{}
		n := rng.IntN(600)
		for i := range n {
			switch rng.IntN(20) {
			case 0: // only the edge has it
				e[pod(i)] = "1"
			case 1: // only the cloud
				w[pod(i)] = "1"
			case 2: // another version
				w[pod(i)], e[pod(i)] = "2", "1"
			default:
				w[pod(i)], e[pod(i)] = "1", "1"
			}
		}
		caps := round%2 == 0
		d := e.digest()
		if caps {
			d = e.subDigest()
		}
		reconnectWith(t, NewNode(Config{}), w, e, d)
		require.Equal(t, edgeSim(w), e, "round %d (caps %v, %d objects)", round, caps, n)
	}
}

func TestSubBucketListBounds(t *testing.T) {
	w, e := world{}, edgeSim{}
	for i := range 400 {
		w[pod(i)], e[pod(i)] = "1", "1"
	}
	w[pod(7)] = "2"
	n := NewNode(Config{})
	d := e.subDigest()
	a := n.OnDigest(d, w)
	require.Equal(t, SendWant, a[0].Kind)
	require.Len(t, a[0].Buckets, 1)
	fan := len(a[0].Sub)
	require.Equal(t, objsync.Fanout(400/len(d.Buckets)), fan, "the want carries the sub-digests of its bucket")
	nb := uint64(len(d.Buckets))
	for _, bad := range []uint64{
		a[0].Buckets[0] + nb*uint64(fan), // beyond nb·fan
		(a[0].Buckets[0] + 1) % nb,       // a bucket not wanted
	} {
		_, err := n.OnList(objsync.Sync{Phase: objsync.PhaseList, Caps: objsync.CapSubBuckets, Buckets: []uint64{bad}}, w)
		require.ErrorIs(t, err, ErrBadList, "sub-bucket %d", bad)
		require.False(t, n.Live(), "the reconcile is abandoned")
		_, err = n.OnList(objsync.Sync{Phase: objsync.PhaseList}, w)
		require.ErrorIs(t, err, ErrUnexpectedList)
		a = n.OnDigest(d, w)
	}
	// Named in the first chunk, entries in the next: the lists of one
	// reconcile add up.
	l := e.answer(a[0], int(nb))
	require.NotEmpty(t, l.Buckets)
	first := objsync.Sync{Phase: objsync.PhaseList, Caps: objsync.CapSubBuckets, Buckets: l.Buckets, More: true}
	last := objsync.Sync{Phase: objsync.PhaseList, Caps: objsync.CapSubBuckets, Entries: l.Entries}
	_, err := n.OnList(first, w)
	require.NoError(t, err)
	acts, err := n.OnList(last, w)
	require.NoError(t, err)
	require.Equal(t, SendDone, acts[len(acts)-1].Kind)
	require.Equal(t, 1, acts[len(acts)-1].Differences)
	require.Len(t, n.Next(time.Now(), w), 1, "only the changed object is sent")
}
