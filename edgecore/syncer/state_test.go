package syncer

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
)

// sim is the I/O around an Edge, in memory: it does the actions the way
// the loop does, against a map for the objects and a coalescing outbox,
// and records what would cross the wire. It lets a test script a session
// without a network or a file.
type sim struct {
	t   *testing.T
	e   *Edge
	now time.Time

	objects map[objsync.Key]store.Object
	outbox  map[objsync.Key]store.OutboxItem
	seq     uint64

	failApply int                     // the next N transactions fail (disk full)
	failReads int                     // the next N inventory or outbox reads fail
	invalid   func(store.Change) bool // changes the store refuses as invalid

	trace []string // "commit N", "ack ID", "refuse ID", in order
	wire  []Action // what was sent: acks, refusals, syncs, upstream
	done  []Action // OutboxDone actions
}

func newSim(t *testing.T, cfg Config) *sim {
	return &sim{t: t, e: NewEdge(cfg), now: time.Unix(1000, 0),
		objects: map[objsync.Key]store.Object{}, outbox: map[objsync.Key]store.OutboxItem{}}
}

// start runs Start and returns the digest sent.
func (s *sim) start() *objsync.Sync {
	s.run(s.e.Start(s.now))
	syncs := s.sent(SendSync)
	require.Len(s.t, syncs, 1)
	require.Equal(s.t, objsync.PhaseDigest, syncs[0].Sync.Phase)
	s.wire = nil
	return syncs[0].Sync
}

func (s *sim) run(acts []Action) {
	for len(acts) > 0 {
		a := acts[0]
		var more []Action
		switch a.Kind {
		case ReadInventory:
			if s.failReads > 0 {
				s.failReads--
				more = s.e.OnInventoryFailed(s.now)
				break
			}
			more = s.e.OnInventory(s.now, s.inventory())
		case ApplyChanges:
			if s.failApply > 0 {
				s.failApply--
				s.trace = append(s.trace, "fail")
				more = s.e.OnCommitFailed(s.now, errors.New("database or disk is full"))
				break
			}
			if s.invalid != nil && slices.ContainsFunc(a.Changes, s.invalid) {
				more = s.e.OnCommitFailed(s.now, fmt.Errorf("apply batch: %w", store.ErrInvalid))
				break
			}
			for _, c := range a.Changes {
				if c.Op == message.OpDelete {
					delete(s.objects, c.Object.Key())
				} else {
					s.objects[c.Object.Key()] = c.Object
				}
			}
			s.trace = append(s.trace, fmt.Sprintf("commit %d", len(a.Changes)))
			more = s.e.OnCommitted(s.now)
		case PruneHashes:
			for _, h := range a.Hashes {
				for k := range s.objects {
					if k.Hash() == h {
						delete(s.objects, k)
					}
				}
			}
			s.trace = append(s.trace, fmt.Sprintf("commit %d", len(a.Hashes)))
			more = s.e.OnCommitted(s.now)
		case ReadOutbox:
			if s.failReads > 0 {
				s.failReads--
				more = s.e.OnOutboxFailed(s.now)
				break
			}
			more = s.e.OnOutbox(s.now, s.pending(a.Limit))
		case OutboxDone:
			if it, ok := s.outbox[a.Item.Key()]; ok && it.Seq == a.Item.Seq {
				delete(s.outbox, a.Item.Key())
			}
			s.done = append(s.done, a)
		case SendAck:
			s.trace = append(s.trace, fmt.Sprintf("ack %d", a.ReplyTo))
			s.wire = append(s.wire, a)
		case SendRefuse:
			s.trace = append(s.trace, fmt.Sprintf("refuse %d", a.ReplyTo))
			s.wire = append(s.wire, a)
		default:
			s.wire = append(s.wire, a)
		}
		acts = append(more, acts[1:]...)
	}
	if d, ok := s.e.Deadline(); ok {
		require.False(s.t, d.Before(s.now), "deadline in the past")
	}
}

func (s *sim) inventory() []objsync.Entry {
	var out []objsync.Entry
	for k, o := range s.objects {
		out = append(out, objsync.Entry{Key: k.Hash(), Version: objsync.VersionHash(o.Resource.UID, o.Version)})
	}
	return out
}

func (s *sim) publish(it store.OutboxItem) {
	s.seq++
	it.Seq = s.seq
	s.outbox[it.Key()] = it
	s.run(s.e.OutboxChanged(s.now))
}

func (s *sim) pending(limit int) []store.OutboxItem {
	var out []store.OutboxItem
	for _, it := range s.outbox {
		out = append(out, it)
	}
	slices.SortFunc(out, func(a, b store.OutboxItem) int { return int(a.Seq) - int(b.Seq) })
	return out[:min(limit, len(out))]
}

// receive feeds messages as one burst, then flushes, as the loop does.
func (s *sim) receive(msgs ...*message.Message) {
	for _, m := range msgs {
		s.run(s.e.Receive(s.now, m))
	}
	s.run(s.e.Flush(s.now))
}

// advance moves the clock to the deadline (if it is before until) and
// ticks, repeatedly, until until.
func (s *sim) advance(until time.Time) {
	for {
		d, ok := s.e.Deadline()
		if !ok || d.After(until) {
			s.now = until
			s.run(s.e.Tick(s.now))
			return
		}
		s.now = d
		s.run(s.e.Tick(s.now))
	}
}

func (s *sim) sent(kind ActionKind) []Action {
	var out []Action
	for _, a := range s.wire {
		if a.Kind == kind {
			out = append(out, a)
		}
	}
	return out
}

func (s *sim) acks() []uint64 {
	var out []uint64
	for _, a := range s.sent(SendAck) {
		out = append(out, a.ReplyTo)
	}
	return out
}

func (s *sim) take() []Action {
	w := s.wire
	s.wire = nil
	return w
}

func podKey(name string) objsync.Key {
	return objsync.Key{Kind: "Pod", Namespace: "default", Name: name}
}

func upsert(id uint64, name, version string) *message.Message {
	return &message.Message{ID: id, Kind: message.KindEvent, Op: message.OpUpsert, Version: version,
		Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "default", Name: name, UID: "uid-" + name},
		Payload:  []byte(`{"v":"` + version + `"}`)}
}

func del(id uint64, name string) *message.Message {
	return &message.Message{ID: id, Kind: message.KindEvent, Op: message.OpDelete,
		Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "default", Name: name}}
}

func syncMsg(t *testing.T, id uint64, p objsync.Sync) *message.Message {
	b, err := message.NewCodec(0).Append(nil, &p)
	require.NoError(t, err)
	return &message.Message{ID: id, Kind: message.KindSync, Payload: b}
}

func kindsOf(acts []Action) []ActionKind {
	out := make([]ActionKind, len(acts))
	for i, a := range acts {
		out[i] = a.Kind
	}
	return out
}

// TestAckOnlyAfterCommit drives the machine by hand: events are acked
// only after OnCommitted for their transaction; a failed commit acks
// nothing and the same batch is applied again after the back-off.
func TestAckOnlyAfterCommit(t *testing.T) {
	e := NewEdge(Config{StoreRetryMin: time.Second})
	now := time.Unix(0, 0)
	require.Equal(t, []ActionKind{ReadInventory, ReadOutbox}, kindsOf(e.Start(now)))
	require.Equal(t, []ActionKind{SendSync}, kindsOf(e.OnInventory(now, nil)))
	require.Empty(t, e.OnOutbox(now, nil))

	for id := uint64(1); id <= 3; id++ {
		require.Empty(t, e.Receive(now, upsert(id, fmt.Sprint("p", id), "1")), "nothing before the flush")
	}
	acts := e.Flush(now)
	require.Equal(t, []ActionKind{ApplyChanges}, kindsOf(acts))
	require.Len(t, acts[0].Changes, 3, "one transaction for the burst")

	// More events while the transaction is outstanding wait for it.
	require.Empty(t, e.Receive(now, upsert(4, "p4", "1")))
	require.Empty(t, e.Flush(now))

	require.Empty(t, e.OnCommitFailed(now, errors.New("database is locked")), "a failed commit acks nothing")
	d, ok := e.Deadline()
	require.True(t, ok)
	require.Equal(t, now.Add(time.Second), d)
	require.Empty(t, e.Tick(now.Add(500*time.Millisecond)), "not before the back-off")
	acts = e.Tick(d)
	require.Equal(t, []ActionKind{ApplyChanges}, kindsOf(acts))
	require.Len(t, acts[0].Changes, 3, "the same batch again")

	acts = e.OnCommitted(d)
	require.Equal(t, []ActionKind{SendAck, SendAck, SendAck, ApplyChanges}, kindsOf(acts))
	require.Equal(t, []uint64{1, 2, 3}, []uint64{acts[0].ReplyTo, acts[1].ReplyTo, acts[2].ReplyTo})
	require.Len(t, acts[3].Changes, 1, "then the event that waited")
	require.Equal(t, []ActionKind{SendAck}, kindsOf(e.OnCommitted(d)))
	require.Equal(t, 1, e.Stats().StoreFailures)
	require.Equal(t, 4, e.Stats().Applied)
}

// TestCommitFailureRetriedInSession injects store failures (the
// transaction fails like a full disk): no ack goes out while they last,
// the events are applied later in the same session, and then acked.
func TestCommitFailureRetriedInSession(t *testing.T) {
	s := newSim(t, Config{})
	s.start()
	s.failApply = 5
	s.receive(upsert(1, "a", "1"), upsert(2, "b", "1"))
	require.Empty(t, s.acks())
	s.advance(s.now.Add(time.Minute))
	require.Equal(t, []string{"fail", "fail", "fail", "fail", "fail", "commit 2", "ack 1", "ack 2"}, s.trace)
	require.Len(t, s.objects, 2)
	require.Equal(t, 5, s.e.Stats().StoreFailures)
}

// TestStaleEventsByID is the edge half of defect 6: an event with a lower
// id than the last applied for its key is acked but not applied.
func TestStaleEventsByID(t *testing.T) {
	s := newSim(t, Config{})
	s.start()

	s.receive(upsert(5, "a", "5"))
	s.receive(upsert(3, "a", "3"))
	require.Equal(t, []uint64{5, 3}, s.acks(), "the stale event is acked")
	require.Equal(t, "5", s.objects[podKey("a")].Version, "and not applied")
	require.Equal(t, 1, s.e.Stats().Stale)

	s.receive(del(7, "b"))
	s.receive(upsert(6, "b", "6"))
	require.NotContains(t, s.objects, podKey("b"), "the deleted object stays deleted")
	require.Equal(t, 2, s.e.Stats().Stale)

	// Within one batch, in arrival order, by the same rule.
	s.receive(upsert(10, "c", "10"), upsert(9, "c", "9"), upsert(11, "d", "11"), del(8, "d"))
	require.Equal(t, "10", s.objects[podKey("c")].Version)
	require.Equal(t, "11", s.objects[podKey("d")].Version)
	require.Equal(t, 4, s.e.Stats().Stale)
	require.Equal(t, []uint64{5, 3, 7, 6, 10, 9, 11, 8}, s.acks())
}

// TestPrunesAckedAfterCommit: several prunes, each acked after its own
// commit; a prune older than an event applied for a key leaves it.
func TestPrunesAckedAfterCommit(t *testing.T) {
	s := newSim(t, Config{})
	s.start()
	s.receive(upsert(20, "new", "1"))
	for _, n := range []string{"x", "y", "z"} {
		s.objects[podKey(n)] = store.Object{Resource: message.Resource{Kind: "Pod", Namespace: "default", Name: n}}
	}
	s.trace = nil
	s.receive(
		syncMsg(t, 11, objsync.Sync{Phase: objsync.PhasePrune, Hashes: []uint64{podKey("x").Hash(), podKey("new").Hash()}}),
		syncMsg(t, 12, objsync.Sync{Phase: objsync.PhasePrune, Hashes: []uint64{podKey("y").Hash()}}),
		syncMsg(t, 13, objsync.Sync{Phase: objsync.PhaseDone}),
	)
	require.Equal(t, []string{"commit 1", "ack 11", "commit 1", "ack 12"}, s.trace)
	require.Contains(t, s.objects, podKey("new"), "an event with a higher id than the prune survives it")
	require.Contains(t, s.objects, podKey("z"))
	require.NotContains(t, s.objects, podKey("x"))
	require.NotContains(t, s.objects, podKey("y"))
	require.Len(t, s.sent(Reconciled), 1)

	// An event older than the prune that removed its key is stale.
	s.receive(upsert(10, "y", "old"))
	require.NotContains(t, s.objects, podKey("y"))
}

// TestListSplitIntoChunks is the edge half of defect 10: a list larger
// than one payload holds goes out in chunks of objsync.MaxEntries, More on
// all but the last.
func TestListSplitIntoChunks(t *testing.T) {
	e := NewEdge(Config{ListChunk: objsync.MaxEntries + 1}) // capped at MaxEntries
	now := time.Unix(0, 0)
	e.Start(now)
	n := 2*objsync.MaxEntries + 5
	inv := make([]objsync.Entry, n)
	for i := range inv {
		inv[i] = objsync.Entry{Key: uint64(i)*0x9e3779b97f4a7c15 + 1, Version: uint64(i)}
	}
	digest := e.OnInventory(now, inv)[0].Sync
	nb := len(digest.Buckets)
	require.Equal(t, uint32(n), digest.Count)
	all := make([]uint64, nb)
	for i := range all {
		all[i] = uint64(i)
	}
	acts := e.Receive(now, syncMsg(t, 1, objsync.Sync{Phase: objsync.PhaseWant, Buckets: all}))
	require.Equal(t, []ActionKind{ReadInventory}, kindsOf(acts))
	acts = e.OnInventory(now, inv)
	require.Len(t, acts, 3)
	var got []objsync.Entry
	for i, a := range acts {
		require.Equal(t, objsync.PhaseList, a.Sync.Phase)
		require.Equal(t, i < 2, a.Sync.More, "chunk %d", i)
		require.NoError(t, a.Sync.Validate(), "each chunk is a valid payload")
		require.Equal(t, uint32(n), a.Sync.Count, "each chunk names the list's total")
		got = append(got, a.Sync.Entries...)
	}
	require.Len(t, acts[2].Sync.Entries, 5)
	byKey := func(a, b objsync.Entry) int { return cmp.Compare(a.Key, b.Key) }
	slices.SortFunc(got, byKey)
	want := slices.Clone(inv)
	slices.SortFunc(want, byKey)
	require.Equal(t, want, got)

	// A want of some buckets lists only theirs, in one message.
	require.Equal(t, []ActionKind{ReadInventory}, kindsOf(e.Receive(now, syncMsg(t, 2, objsync.Sync{Phase: objsync.PhaseWant, Buckets: []uint64{3}}))))
	acts = e.OnInventory(now, inv)
	require.Len(t, acts, 1)
	require.False(t, acts[0].Sync.More)
	for _, x := range acts[0].Sync.Entries {
		require.Equal(t, 3, objsync.Bucket(x.Key, nb))
	}
}

func lease(name string) store.OutboxItem {
	return store.OutboxItem{Op: message.OpUpsert, Resource: message.Resource{Group: "coordination.k8s.io", Version: "v1", Kind: "Lease", Namespace: "kube-node-lease", Name: name}, Data: []byte(`{}`)}
}

func answer(t *testing.T, kind message.Kind, a Action, afterMillis uint32) *message.Message {
	m := &message.Message{Kind: kind, ReplyTo: a.Item.Seq}
	switch kind {
	case message.KindRetry:
		b, err := message.NewCodec(0).Append(nil, &message.Retry{AfterMillis: afterMillis, Reason: "throttled"})
		require.NoError(t, err)
		m.Payload = b
	case message.KindRefuse:
		m.Payload = []byte("forbidden")
	}
	return m
}

// TestUpstreamRetryNeverLeaksTheWindow is the edge half of defect 4: 200
// Retry answers in a row (more than the window) within one session, and
// the lease still goes out afterwards; each item backs off on its own,
// 1s doubling to 60s or the cloud's hint.
func TestUpstreamRetryNeverLeaksTheWindow(t *testing.T) {
	s := newSim(t, Config{})
	s.start()
	for i := range 200 {
		s.publish(store.OutboxItem{Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "default", Name: fmt.Sprint("p", i)}, Data: []byte(`{}`)})
	}
	require.Len(t, s.sent(SendUpstream), 128, "a window's worth is sent")
	retries := 0
	for retries < 200 {
		ups := s.take()
		for _, a := range ups {
			if retries < 200 {
				s.receive(answer(t, message.KindRetry, a, 0))
				retries++
			}
		}
		if len(ups) == 0 {
			d, ok := s.e.Deadline()
			require.True(t, ok, "items in back-off are always scheduled")
			s.advance(d)
		}
	}
	require.Equal(t, 200, s.e.Stats().UpstreamRetried)
	require.Zero(t, s.e.up.inflight, "every Retry left the window")
	s.take()
	s.publish(lease("edge-1"))
	ups := s.sent(SendUpstream)
	require.NotEmpty(t, ups)
	require.Equal(t, "Lease", ups[len(ups)-1].Item.Resource.Kind, "the lease goes out")
	s.receive(answer(t, message.KindAck, ups[len(ups)-1], 0))
	require.NotContains(t, s.outbox, lease("edge-1").Key(), "and its ack removes it")

	// One item's back-off: 1s, 2s, 4s, ... 60s; a longer hint wins.
	s2 := newSim(t, Config{})
	s2.start()
	s2.publish(lease("edge-2"))
	var gaps []time.Duration
	last := s2.now
	for i := range 9 {
		ups := s2.sent(SendUpstream)
		require.Len(t, ups, 1)
		s2.wire = nil
		gaps = append(gaps, s2.now.Sub(last))
		last = s2.now
		hint := uint32(0)
		if i == 7 {
			hint = 90_000
		}
		s2.receive(answer(t, message.KindRetry, ups[0], hint))
		d, ok := s2.e.Deadline()
		require.True(t, ok)
		s2.advance(d)
	}
	require.Equal(t, []time.Duration{0, 1, 2, 4, 8, 16, 32, 60, 90}, secondsOf(gaps))
}

func secondsOf(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d / time.Second
	}
	return out
}

// TestUpstreamRefuseDroppedAndUnansweredResent: a refusal is final (the
// item leaves the outbox and is never sent again); an item without an
// answer for ResendAfter is sent again.
func TestUpstreamRefuseDroppedAndUnansweredResent(t *testing.T) {
	s := newSim(t, Config{ResendAfter: 30 * time.Second})
	s.start()
	s.publish(lease("a"))
	s.publish(store.OutboxItem{Op: message.OpUpsert, Resource: message.Resource{Version: "v1", Kind: "Node", Name: "a"}, Data: []byte(`{}`)})
	ups := s.take()
	require.Len(t, ups, 2)
	s.receive(answer(t, message.KindRefuse, ups[1], 0))
	require.Len(t, s.done, 1)
	require.Equal(t, Refused, s.done[0].Outcome)
	require.Equal(t, "forbidden", s.done[0].Detail)
	require.Len(t, s.outbox, 1)

	s.advance(s.now.Add(29 * time.Second))
	require.Empty(t, s.sent(SendUpstream))
	s.advance(s.now.Add(time.Second))
	require.Empty(t, s.sent(SendUpstream), "out of the window, waiting for its back-off")
	s.advance(s.now.Add(time.Second))
	resent := s.take()
	require.Len(t, resent, 1, "the unanswered lease, not the refused node")
	require.Equal(t, "Lease", resent[0].Item.Resource.Kind)
	s.advance(s.now.Add(time.Hour))
	for _, a := range s.take() {
		require.Equal(t, "Lease", a.Item.Resource.Kind, "the refused item is never sent again")
	}
	require.Equal(t, 1, s.e.Stats().UpstreamRefused)
	require.Positive(t, s.e.Stats().UpstreamResent)
}

// TestUpstreamNewerItemReplacesWaiting: a newer item for an object in
// back-off replaces it and goes out at once; an item too large for a
// frame is dropped and the next one sent.
func TestUpstreamNewerItemReplacesWaiting(t *testing.T) {
	s := newSim(t, Config{})
	s.start()
	s.publish(lease("a"))
	first := s.take()[0]
	s.receive(answer(t, message.KindRetry, first, 50_000))
	s.publish(lease("a"))
	next := s.take()
	require.Len(t, next, 1)
	require.Greater(t, next[0].Item.Seq, first.Item.Seq)
	s.receive(answer(t, message.KindRetry, first, 0)) // late answer of the replaced item: ignored
	s.receive(answer(t, message.KindAck, next[0], 0))
	require.Empty(t, s.outbox)
	s.advance(s.now.Add(time.Hour))
	require.Empty(t, s.take(), "the replaced item is not sent again")

	s.publish(store.OutboxItem{Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "d", Name: "big"}, Data: []byte(`{}`)})
	s.publish(lease("b"))
	ups := s.take()
	require.Len(t, ups, 2)
	s.run(s.e.OnTooLarge(s.now, ups[0].Item.Seq))
	require.Equal(t, TooLarge, s.done[len(s.done)-1].Outcome)
	require.Len(t, s.outbox, 1)
	require.Equal(t, 1, s.e.Stats().UpstreamTooLarge)
}

// TestInvalidEventRefusedOthersApplied: a batch the store refuses as
// invalid is applied again one event per transaction; the invalid event
// is refused, the others applied and acked.
func TestInvalidEventRefusedOthersApplied(t *testing.T) {
	s := newSim(t, Config{})
	s.start()
	s.invalid = func(c store.Change) bool { return c.Object.Resource.Name == "bad" }
	s.receive(upsert(1, "a", "1"), upsert(2, "bad", "1"), upsert(3, "c", "1"))
	require.Equal(t, []string{"commit 1", "ack 1", "refuse 2", "commit 1", "ack 3"}, s.trace)
	s.receive(upsert(4, "d", "1"), upsert(5, "e", "1"))
	require.Equal(t, "commit 2", s.trace[len(s.trace)-3], "then batches again")
}

// TestRouting: renewal answers go to Renew, unknown kinds and bad
// payloads are refused, a refusal of something unknown is reported.
func TestRouting(t *testing.T) {
	e := NewEdge(Config{})
	now := time.Unix(0, 0)
	for _, k := range []message.Kind{message.KindRenew, message.KindRefuse} {
		acts := e.Receive(now, &message.Message{Kind: k, ReplyTo: renewIDBase + 1})
		require.Equal(t, []ActionKind{DeliverRenewal}, kindsOf(acts))
	}
	for _, tt := range []struct {
		m      *message.Message
		reason string
	}{
		{&message.Message{ID: 1, Kind: message.KindUpstream, Op: message.OpUpsert}, "unexpected_kind"},
		{&message.Message{ID: 2, Kind: message.KindRenew, ReplyTo: 7}, "unexpected_kind"},
		{&message.Message{ID: 3, Kind: message.KindSync, Payload: []byte{0xc1}}, "bad_sync"},
		{syncMsg(t, 4, objsync.Sync{Phase: objsync.PhaseWant}), "bad_sync"}, // before the digest
		{syncMsg(t, 5, objsync.Sync{Phase: objsync.PhaseDigest, Buckets: []uint64{0}}), "bad_sync"},
		{&message.Message{ID: 6, Kind: message.KindEvent, Op: message.OpUpsert}, "bad_event"},
	} {
		acts := e.Receive(now, tt.m)
		require.Equal(t, []ActionKind{SendRefuse}, kindsOf(acts), "%v", tt.m.Kind)
		require.Equal(t, tt.reason, acts[0].Reason)
		require.Equal(t, tt.m.ID, acts[0].ReplyTo)
	}
	acts := e.Receive(now, &message.Message{Kind: message.KindRefuse, Payload: []byte("list too long")})
	require.Equal(t, []ActionKind{Report}, kindsOf(acts))
	require.Empty(t, e.Receive(now, &message.Message{Kind: message.KindAck, ReplyTo: 99}), "a late ack changes nothing")
}

// TestFailedReadsRetried: failed inventory and outbox reads are tried
// again after a back-off; the digest and the outbox still go out.
func TestFailedReadsRetried(t *testing.T) {
	s := newSim(t, Config{})
	s.seq++
	s.outbox[lease("a").Key()] = store.OutboxItem{Seq: s.seq, Op: message.OpUpsert, Resource: lease("a").Resource, Data: []byte(`{}`)}
	s.failReads = 4 // inventory, outbox, inventory, outbox
	s.run(s.e.Start(s.now))
	require.Empty(t, s.wire)
	s.advance(s.now.Add(time.Second))
	require.Equal(t, []ActionKind{SendSync, SendUpstream}, kindsOf(s.take()))
	require.Equal(t, 4, s.e.Stats().StoreFailures)
}

// TestOverflowWhileStoreFails: events beyond the bound that arrive while
// the store fails are dropped unacked (the cloud resends them); those
// kept are applied and acked once the store recovers.
func TestOverflowWhileStoreFails(t *testing.T) {
	s := newSim(t, Config{MaxBatch: 4})
	s.start()
	s.failApply = 3
	var msgs []*message.Message
	for i := range 4 + maxPending*4 + 3 {
		msgs = append(msgs, upsert(uint64(i+1), fmt.Sprint("p", i), "1"))
	}
	s.receive(msgs...)
	require.Empty(t, s.acks())
	require.Equal(t, 3, s.e.Stats().Overflow)
	s.advance(s.now.Add(time.Minute))
	require.Len(t, s.acks(), 4+maxPending*4)
	require.Len(t, s.objects, 4+maxPending*4)
}

// TestUnansweredItemsDoNotHoldTheWindow: a window full of items the cloud
// never answers (an older cloud, lost answers) does not keep the lease
// out: after ResendAfter they leave the window and back off.
func TestUnansweredItemsDoNotHoldTheWindow(t *testing.T) {
	s := newSim(t, Config{OutboxWindow: 8})
	s.start()
	for i := range 8 {
		s.publish(store.OutboxItem{Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "default", Name: fmt.Sprint("p", i)}, Data: []byte(`{}`)})
	}
	require.Len(t, s.take(), 8)
	s.publish(lease("edge-1"))
	require.Empty(t, s.take(), "the window is full")
	s.advance(s.now.Add(30 * time.Second))
	ups := s.take()
	require.Len(t, ups, 1)
	require.Equal(t, "Lease", ups[0].Item.Resource.Kind, "the lease goes out first")
	s.advance(s.now.Add(time.Second))
	require.Len(t, s.take(), 7, "then the others, after their back-off, as the window allows")
}

// The edge announces sub-buckets in its digest. A want with sub-digests
// is answered with the entries of the sub-buckets that differ only, named
// in the list; a want without them (a cloud that predates sub-buckets) is
// answered with the wanted buckets whole, as before.
func TestListBySubBuckets(t *testing.T) {
	e := NewEdge(Config{})
	now := time.Unix(0, 0)
	e.Start(now)
	inv := make([]objsync.Entry, 400)
	for i := range inv {
		inv[i] = objsync.Entry{Key: podKey(fmt.Sprintf("p-%d", i)).Hash(), Version: objsync.VersionHash("u", "1")}
	}
	digest := e.OnInventory(now, inv)[0].Sync
	require.Equal(t, objsync.CapSubBuckets, digest.Caps)
	nb := len(digest.Buckets)

	// What the cloud holds: 5 objects at another version, one the edge
	// lacks, one the edge holds but should not.
	cloud := slices.Clone(inv)
	for i := range 5 {
		cloud[i*71].Version = objsync.VersionHash("u", "2")
	}
	cloud[399] = objsync.Entry{Key: podKey("new").Hash(), Version: 1}
	dc, de := objsync.NewDigest(nb), objsync.NewDigest(nb)
	for i := range inv {
		dc.Add(cloud[i])
		de.Add(inv[i])
	}
	var want []uint64
	for _, b := range dc.Diff(de.Buckets) {
		want = append(want, uint64(b))
	}
	fan := 4
	sc := objsync.NewSubDigest(nb, fan, want)
	for _, x := range cloud {
		sc.Add(x)
	}

	whole := func() []objsync.Entry {
		acts := e.Receive(now, syncMsg(t, 1, objsync.Sync{Phase: objsync.PhaseWant, Buckets: want}))
		require.Equal(t, []ActionKind{ReadInventory}, kindsOf(acts))
		acts = e.OnInventory(now, inv)
		require.Len(t, acts, 1)
		l := acts[0].Sync
		require.Zero(t, l.Caps, "listed whole")
		require.Nil(t, l.Buckets)
		return l.Entries
	}()

	acts := e.Receive(now, syncMsg(t, 2, objsync.Sync{Phase: objsync.PhaseWant, Buckets: want, Sub: sc.Sums}))
	require.Equal(t, []ActionKind{ReadInventory}, kindsOf(acts))
	acts = e.OnInventory(now, inv)
	require.Len(t, acts, 1)
	l := acts[0].Sync
	require.NoError(t, l.Validate())
	require.Equal(t, objsync.CapSubBuckets, l.Caps)
	// The sub-buckets named are exactly those in which edge and cloud
	// differ, and the entries exactly the edge's in them.
	differ := map[uint64]bool{}
	for i := range inv {
		if inv[i] != cloud[i] {
			differ[sc.Sub(inv[i].Key)] = true
			differ[sc.Sub(cloud[i].Key)] = true
		}
	}
	require.ElementsMatch(t, slices.Collect(maps.Keys(differ)), l.Buckets)
	var in []objsync.Entry
	for _, x := range inv {
		if differ[sc.Sub(x.Key)] {
			in = append(in, x)
		}
	}
	require.ElementsMatch(t, in, l.Entries)
	t.Logf("listed %d entries by sub-bucket, %d whole", len(l.Entries), len(whole))
	require.Less(t, 3*len(l.Entries), len(whole))
}
