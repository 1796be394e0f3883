package syncer

import (
	"errors"
	"fmt"
	"time"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
)

// unit is one message that writes to the store: an event or a prune.
type unit struct {
	id     uint64
	change store.Change // an event
	hash   uint64       // the event's key hash
	prune  []uint64     // a prune's key hashes (nil for an event)
}

func (u unit) isPrune() bool { return u.prune != nil }

// batch is the one transaction outstanding: applying, or waiting to be
// tried again after a failure.
type batch struct {
	units    []unit
	changes  []store.Change
	hashes   []uint64          // a prune's hashes that are not stale
	acks     []uint64          // every unit's id, in arrival order
	applied  map[uint64]uint64 // key hash -> the id this batch commits for it
	stale    int
	applying bool
}

// objects is the object-sync concern: the reconcile (digest, list) and
// the events and prunes the cloud sends, applied in batches.
type objects struct {
	nb         int // buckets of the digest sent; 0 before it is
	want       []uint64
	sub        []uint64 // the want's sub-bucket digests, if it had them
	wantListed bool     // the last want has been answered
	invReading bool
	invFails   int
	invRetryAt time.Time

	// applied is, per key hash, the id of the last event or prune
	// committed for it in this session.
	applied map[uint64]uint64
	pending []unit
	batch   *batch
	single  int // units to apply one per transaction (after an invalid batch)
	fails   int
	retryAt time.Time
}

func newObjects() objects {
	return objects{applied: make(map[uint64]uint64), wantListed: true}
}

func (o *objects) start() []Action {
	o.invReading = true
	return []Action{{Kind: ReadInventory}}
}

// maxPending bounds the events waiting behind a failing store, in batches.
const maxPending = 8

// receiveEvent queues an event; a full batch is applied at once, the rest
// at Flush.
func (e *Edge) receiveEvent(now time.Time, m *message.Message) []Action {
	ch, err := toChange(m)
	if err != nil {
		return refuse(m.ID, "bad_event", err.Error())
	}
	o := &e.obj
	if len(o.pending) >= maxPending*e.cfg.MaxBatch {
		e.stats.Overflow++
		return nil
	}
	o.pending = append(o.pending, unit{id: m.ID, change: ch, hash: ch.Object.Key().Hash()})
	if len(o.pending) >= e.cfg.MaxBatch {
		return e.Flush(now)
	}
	return nil
}

// Flush applies what has been received and not yet applied: the loop
// calls it when no more messages are waiting, so that consecutive events
// share one transaction.
func (e *Edge) Flush(time.Time) []Action {
	o := &e.obj
	var acts []Action
	for o.batch == nil && len(o.pending) > 0 {
		b := e.nextBatch()
		if len(b.changes) == 0 && len(b.hashes) == 0 {
			// Every message in it is stale: nothing to write.
			e.stats.Stale += b.stale
			for _, id := range b.acks {
				acts = append(acts, Action{Kind: SendAck, ReplyTo: id})
			}
			continue
		}
		o.batch = b
		acts = append(acts, b.action())
	}
	return acts
}

// nextBatch takes the next transaction from pending: one prune, or
// consecutive events up to MaxBatch (one after an invalid batch). An
// event whose id is lower than the last applied for its key, also earlier
// in the same batch, is stale: acked with the batch, not written.
func (e *Edge) nextBatch() *batch {
	o := &e.obj
	b := &batch{applied: make(map[uint64]uint64)}
	last := func(h uint64) uint64 {
		if id, ok := b.applied[h]; ok {
			return id
		}
		return o.applied[h]
	}
	if u := o.pending[0]; u.isPrune() {
		o.pending = o.pending[1:]
		b.units = []unit{u}
		b.acks = []uint64{u.id}
		for _, h := range u.prune {
			if u.id < last(h) {
				b.stale++
				continue
			}
			b.hashes = append(b.hashes, h)
			b.applied[h] = u.id
		}
		return b
	}
	limit := e.cfg.MaxBatch
	if o.single > 0 {
		limit = 1
		o.single--
	}
	n := 0
	for n < len(o.pending) && n < limit && !o.pending[n].isPrune() {
		u := o.pending[n]
		n++
		b.units = append(b.units, u)
		b.acks = append(b.acks, u.id)
		if u.id < last(u.hash) {
			b.stale++
			continue
		}
		b.changes = append(b.changes, u.change)
		b.applied[u.hash] = u.id
	}
	o.pending = o.pending[n:]
	return b
}

func (b *batch) action() Action {
	b.applying = true
	if b.units[0].isPrune() {
		return Action{Kind: PruneHashes, Hashes: b.hashes}
	}
	return Action{Kind: ApplyChanges, Changes: b.changes}
}

// OnCommitted records that the outstanding transaction committed: its
// messages are acked, and the next batch, if any, is applied.
func (e *Edge) OnCommitted(now time.Time) []Action {
	o := &e.obj
	b := o.batch
	if b == nil || !b.applying {
		return nil
	}
	o.batch, o.fails, o.retryAt = nil, 0, time.Time{}
	for h, id := range b.applied {
		o.applied[h] = max(o.applied[h], id)
	}
	e.stats.Stale += b.stale
	if b.units[0].isPrune() {
		e.stats.Pruned += len(b.hashes)
	} else {
		e.stats.Applied += len(b.changes)
	}
	e.stats.Batches++
	acts := make([]Action, 0, len(b.acks))
	for _, id := range b.acks {
		acts = append(acts, Action{Kind: SendAck, ReplyTo: id})
	}
	return append(acts, e.Flush(now)...)
}

// OnCommitFailed records that the outstanding transaction failed with err
// and wrote nothing. Nothing is acked. An invalid batch (store.ErrInvalid)
// is applied again one message per transaction, and an invalid single
// event is refused; any other error is retried after a back-off.
func (e *Edge) OnCommitFailed(now time.Time, err error) []Action {
	o := &e.obj
	b := o.batch
	if b == nil || !b.applying {
		return nil
	}
	b.applying = false
	if errors.Is(err, store.ErrInvalid) {
		o.batch = nil
		if len(b.units) > 1 {
			o.pending = append(append([]unit(nil), b.units...), o.pending...)
			o.single = len(b.units)
			return e.Flush(now)
		}
		acts := refuse(b.units[0].id, "bad_event", err.Error())
		return append(acts, e.Flush(now)...)
	}
	e.stats.StoreFailures++
	o.fails++
	o.retryAt = now.Add(backoff(o.fails, e.cfg.StoreRetryMin, e.cfg.StoreRetryMax))
	return nil
}

// receiveSync handles the reconcile phases the cloud sends.
func (e *Edge) receiveSync(now time.Time, m *message.Message) []Action {
	var p objsync.Sync
	if err := e.codec.UnmarshalValue(m.Payload, &p); err != nil {
		return refuse(m.ID, "bad_sync", err.Error())
	}
	if err := p.Validate(); err != nil {
		return refuse(m.ID, "bad_sync", err.Error())
	}
	o := &e.obj
	switch p.Phase {
	case objsync.PhaseWant:
		if o.nb == 0 {
			return refuse(m.ID, "bad_sync", "want before the digest was sent")
		}
		o.want, o.sub, o.wantListed = p.Buckets, p.Sub, false
		if o.invReading {
			return nil // answered when the read in progress returns
		}
		o.invReading = true
		return []Action{{Kind: ReadInventory}}
	case objsync.PhasePrune:
		hashes := p.Hashes
		if hashes == nil {
			hashes = []uint64{}
		}
		o.pending = append(o.pending, unit{id: m.ID, prune: hashes})
		return e.Flush(now)
	case objsync.PhaseDone:
		return []Action{{Kind: Reconciled}}
	default:
		return refuse(m.ID, "bad_sync", fmt.Sprintf("the cloud sent sync phase %d", p.Phase))
	}
}

// OnInventory takes the store's inventory: the first one makes the
// digest, later ones answer the cloud's want with the entries of the
// wanted buckets (of their sub-buckets that differ, when the want carries
// sub-digests: listEntries), in chunks of at most Config.ListChunk (itself
// at most objsync.MaxEntries). Every chunk carries in Count the number of
// entries of the whole list, so that a receiver can tell when it has them
// all even if chunks overtake one another.
func (e *Edge) OnInventory(_ time.Time, inv []objsync.Entry) []Action {
	o := &e.obj
	if !o.invReading {
		return nil
	}
	o.invReading, o.invFails, o.invRetryAt = false, 0, time.Time{}
	var acts []Action
	if o.nb == 0 {
		o.nb = objsync.BucketCount(len(inv))
		d := objsync.NewDigest(o.nb)
		for _, x := range inv {
			d.Add(x)
		}
		acts = append(acts, Action{Kind: SendSync, Sync: &objsync.Sync{Phase: objsync.PhaseDigest, Count: uint32(len(inv)), Buckets: d.Buckets, Caps: objsync.CapSubBuckets}})
	}
	if o.wantListed {
		return acts
	}
	o.wantListed = true
	entries, subs, caps := o.listEntries(inv)
	total := uint32(len(entries))
	for {
		n := min(len(entries), e.cfg.ListChunk)
		chunk := &objsync.Sync{Phase: objsync.PhaseList, Count: total, Entries: entries[:n:n], More: n < len(entries), Caps: caps, Buckets: subs}
		subs = nil // named once, in the first chunk
		acts = append(acts, Action{Kind: SendSync, Sync: chunk})
		entries = entries[n:]
		if !chunk.More {
			return acts
		}
	}
}

// listEntries returns the entries of inv that answer the last want: those
// of the wanted buckets or, when the want carries sub-digests, those of
// the sub-buckets whose digest differs from the cloud's, which it also
// returns, with CapSubBuckets. (Validate has checked that the sub-digests
// are a power of two per wanted bucket.)
func (o *objects) listEntries(inv []objsync.Entry) (entries []objsync.Entry, subs []uint64, caps objsync.Caps) {
	if len(o.sub) > 0 {
		sd := objsync.NewSubDigest(o.nb, len(o.sub)/len(o.want), o.want)
		for _, x := range inv {
			sd.Add(x)
		}
		subs = sd.Diff(o.sub)
		differ := make(map[uint64]bool, len(subs))
		for _, c := range subs {
			differ[c] = true
		}
		for _, x := range inv {
			if differ[sd.Sub(x.Key)] {
				entries = append(entries, x)
			}
		}
		if subs == nil {
			subs = []uint64{}
		}
		return entries, subs, objsync.CapSubBuckets
	}
	wanted := make(map[int]bool, len(o.want))
	for _, b := range o.want {
		if b < uint64(o.nb) {
			wanted[int(b)] = true
		}
	}
	for _, x := range inv {
		if wanted[objsync.Bucket(x.Key, o.nb)] {
			entries = append(entries, x)
		}
	}
	return entries, nil, 0
}

// OnInventoryFailed records a failed inventory read; it is tried again
// after a back-off.
func (e *Edge) OnInventoryFailed(now time.Time) []Action {
	o := &e.obj
	if !o.invReading {
		return nil
	}
	e.stats.StoreFailures++
	o.invFails++
	o.invRetryAt = now.Add(backoff(o.invFails, e.cfg.StoreRetryMin, e.cfg.StoreRetryMax))
	return nil
}

func (o *objects) tick(now time.Time) []Action {
	var acts []Action
	if !o.invRetryAt.IsZero() && !now.Before(o.invRetryAt) {
		o.invRetryAt = time.Time{}
		acts = append(acts, Action{Kind: ReadInventory})
	}
	if b := o.batch; b != nil && !b.applying && !now.Before(o.retryAt) {
		o.retryAt = time.Time{}
		acts = append(acts, b.action())
	}
	return acts
}

func (o *objects) deadline() time.Time {
	switch {
	case o.invRetryAt.IsZero():
		return o.retryAt
	case o.retryAt.IsZero() || o.invRetryAt.Before(o.retryAt):
		return o.invRetryAt
	default:
		return o.retryAt
	}
}

// toChange checks an event's envelope and makes it a store change.
func toChange(m *message.Message) (store.Change, error) {
	switch m.Op {
	case message.OpUpsert:
		if len(m.Payload) == 0 || m.Resource.Kind == "" || m.Resource.Name == "" {
			return store.Change{}, errors.New("upsert without object, kind or name")
		}
	case message.OpDelete:
		if m.Resource.Kind == "" || m.Resource.Name == "" {
			return store.Change{}, errors.New("delete without kind or name")
		}
	default:
		return store.Change{}, fmt.Errorf("event with op %s", m.Op)
	}
	return store.Change{Op: m.Op, Object: store.Object{Resource: m.Resource, Version: m.Version, Data: m.Payload}}, nil
}
