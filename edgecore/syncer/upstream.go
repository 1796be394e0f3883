package syncer

import (
	"cmp"
	"slices"
	"time"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
)

// upItem is one outbox item the session knows: in the window (sent,
// awaiting the cloud's answer) or waiting until due.
type upItem struct {
	item     store.OutboxItem
	inflight bool
	sentAt   time.Time
	due      time.Time
	attempts int // Retry answers so far
}

// upstream is the outbox concern: which items are in the window and
// which wait for their back-off. The outbox itself (one item per object,
// newest wins) is in the store.
type upstream struct {
	bySeq    map[uint64]*upItem
	byKey    map[objsync.Key]*upItem
	inflight int

	dirty       bool // the outbox may hold items not read yet
	reading     bool
	readFails   int
	readRetryAt time.Time
}

// maxRetryHint bounds the cloud's retry hint, whatever it says.
const maxRetryHint = 10 * time.Minute

func newUpstream() upstream {
	return upstream{bySeq: make(map[uint64]*upItem), byKey: make(map[objsync.Key]*upItem)}
}

// OutboxChanged records that an item was published: read the outbox when
// the window has room.
func (e *Edge) OutboxChanged(now time.Time) []Action {
	e.up.dirty = true
	return e.pumpUpstream(now)
}

// readLimit is how many outbox items a read asks for: room for a window
// of new items behind the known ones, bounded.
func (e *Edge) readLimit() int {
	return min(e.cfg.OutboxWindow+len(e.up.bySeq), 4*e.cfg.OutboxWindow)
}

// OnOutbox takes the pending items read from the store, oldest first. An
// item for a key already known under an older seq replaces it.
func (e *Edge) OnOutbox(now time.Time, items []store.OutboxItem) []Action {
	u := &e.up
	if !u.reading {
		return nil
	}
	u.reading, u.readFails = false, 0
	added := 0
	for _, it := range items {
		if _, ok := u.bySeq[it.Seq]; ok {
			continue
		}
		key := it.Key()
		if old := u.byKey[key]; old != nil {
			if old.item.Seq > it.Seq {
				continue
			}
			u.remove(old)
		}
		x := &upItem{item: it, due: now}
		u.bySeq[it.Seq], u.byKey[key] = x, x
		added++
	}
	if added > 0 && len(items) >= e.readLimit() {
		u.dirty = true // there may be more behind them
	}
	return e.pumpUpstream(now)
}

// OnOutboxFailed records a failed outbox read; it is tried again after a
// back-off.
func (e *Edge) OnOutboxFailed(now time.Time) []Action {
	u := &e.up
	if !u.reading {
		return nil
	}
	e.stats.StoreFailures++
	u.reading, u.dirty = false, true
	u.readFails++
	u.readRetryAt = now.Add(backoff(u.readFails, e.cfg.StoreRetryMin, e.cfg.StoreRetryMax))
	return nil
}

// OnTooLarge records that the item with seq can never be sent: it is
// dropped from the outbox.
func (e *Edge) OnTooLarge(now time.Time, seq uint64) []Action {
	x := e.up.bySeq[seq]
	if x == nil {
		return nil
	}
	e.up.remove(x)
	e.stats.UpstreamTooLarge++
	acts := []Action{{Kind: OutboxDone, Item: x.item, Outcome: TooLarge}}
	return append(acts, e.pumpUpstream(now)...)
}

// receiveAnswer takes the cloud's answer to an upstream write: Ack and
// Refuse end it, Retry puts it back to wait for its back-off.
func (e *Edge) receiveAnswer(now time.Time, m *message.Message) []Action {
	u := &e.up
	x := u.bySeq[m.ReplyTo]
	if x == nil {
		if m.Kind == message.KindRefuse {
			// A refusal of a digest or list, or of an item replaced since.
			return []Action{{Kind: Report, Reason: "cloud_refused", Detail: reason(m.Payload)}}
		}
		return nil // a late answer for an item already done or replaced
	}
	var acts []Action
	switch m.Kind {
	case message.KindAck:
		u.remove(x)
		e.stats.UpstreamAcked++
		acts = append(acts, Action{Kind: OutboxDone, Item: x.item, Outcome: Acked})
	case message.KindRefuse:
		u.remove(x)
		e.stats.UpstreamRefused++
		acts = append(acts, Action{Kind: OutboxDone, Item: x.item, Outcome: Refused, Detail: reason(m.Payload)})
	default: // KindRetry
		var r message.Retry
		if err := e.codec.UnmarshalValue(m.Payload, &r); err != nil {
			r = message.Retry{} // the hint is advisory: fall back to our back-off
		}
		if x.inflight {
			x.inflight = false
			u.inflight--
		}
		x.attempts++
		hint := min(time.Duration(r.AfterMillis)*time.Millisecond, maxRetryHint)
		x.due = now.Add(max(hint, backoff(x.attempts, e.cfg.RetryMin, e.cfg.RetryMax)))
		e.stats.UpstreamRetried++
	}
	return append(acts, e.pumpUpstream(now)...)
}

// tickUpstream takes out of the window what has waited too long for an
// answer, to be sent again after its back-off as if the cloud had said
// Retry (so that items the cloud never answers cannot hold the window),
// then sends what is due.
func (e *Edge) tickUpstream(now time.Time) []Action {
	u := &e.up
	for _, x := range u.bySeq {
		if x.inflight && now.Sub(x.sentAt) >= e.cfg.ResendAfter {
			x.inflight = false
			u.inflight--
			x.attempts++
			x.due = now.Add(backoff(x.attempts, e.cfg.RetryMin, e.cfg.RetryMax))
			e.stats.UpstreamResent++
		}
	}
	if !u.readRetryAt.IsZero() && !now.Before(u.readRetryAt) {
		u.readRetryAt = time.Time{}
	}
	return e.pumpUpstream(now)
}

// pumpUpstream sends due items while the window has room, oldest first,
// and reads the outbox when it may hold more.
func (e *Edge) pumpUpstream(now time.Time) []Action {
	u := &e.up
	window := e.cfg.OutboxWindow
	var acts []Action
	if u.inflight < window {
		for _, x := range u.sorted() {
			if u.inflight >= window {
				break
			}
			if x.inflight || x.due.After(now) {
				continue
			}
			x.inflight, x.sentAt = true, now
			u.inflight++
			acts = append(acts, Action{Kind: SendUpstream, Item: x.item})
		}
	}
	if u.dirty && !u.reading && u.readRetryAt.IsZero() && u.inflight < window {
		u.dirty, u.reading = false, true
		acts = append(acts, Action{Kind: ReadOutbox, Limit: e.readLimit()})
	}
	return acts
}

func (u *upstream) remove(x *upItem) {
	delete(u.bySeq, x.item.Seq)
	if key := x.item.Key(); u.byKey[key] == x {
		delete(u.byKey, key)
	}
	if x.inflight {
		x.inflight = false
		u.inflight--
	}
}

func (u *upstream) sorted() []*upItem {
	out := make([]*upItem, 0, len(u.bySeq))
	for _, x := range u.bySeq {
		out = append(out, x)
	}
	slices.SortFunc(out, func(a, b *upItem) int { return cmp.Compare(a.item.Seq, b.item.Seq) })
	return out
}

func (u *upstream) deadline(cfg Config) time.Time {
	var t time.Time
	earliest := func(c time.Time) {
		if t.IsZero() || c.Before(t) {
			t = c
		}
	}
	for _, x := range u.bySeq {
		switch {
		case x.inflight:
			earliest(x.sentAt.Add(cfg.ResendAfter))
		case u.inflight < cfg.OutboxWindow:
			earliest(x.due)
		}
	}
	if !u.readRetryAt.IsZero() {
		earliest(u.readRetryAt)
	}
	return t
}

// reason bounds a reason received from the cloud for logs.
func reason(p []byte) string {
	const maxReason = 256
	if len(p) > maxReason {
		p = p[:maxReason]
	}
	return string(p)
}
