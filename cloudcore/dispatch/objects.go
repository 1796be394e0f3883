package dispatch

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/tunnel"
)

// objects is the object-sync handler of one session, run by the
// session's loop (conn.run): the node's state machine, fed with acks,
// refusals and sync messages from the edge, changes from the catalog and
// ticks, and the sending of what it decides. Only the loop touches it.
type objects struct {
	c     *conn
	st    *Node
	view  lookup
	inbox *inbox

	// tick runs, once a second, only while the state machine has
	// something to time (needTick): an idle session holds no running
	// timer. ticking says whether it runs.
	tick    *time.Ticker
	ticking bool

	// reported is the count of objects held last told to Sessions, -1
	// before the first; reportedAt when.
	reported   int
	reportedAt time.Time
	// digestAt is when the reconcile in progress began (its digest
	// arrived), for tether_sync_reconcile_seconds.
	digestAt time.Time
}

// heldReportEvery bounds how often a session tells Sessions how many
// objects the edge holds: the EdgeNode's status is written at most that
// often per node, however busy its sync.
const heldReportEvery = 10 * time.Second

// tickEvery is the period of the ticks that resend unacked messages and
// report the objects held.
const tickEvery = time.Second

func newObjects(c *conn, b *inbox) *objects {
	t := time.NewTicker(tickEvery)
	t.Stop() // started by flush when there is something to time
	return &objects{c: c, st: NewNode(c.d.cfg), view: lookup{c.d.cat, c.node}, inbox: b, tick: t, reported: -1}
}

// lookup is one node's view of the catalog.
type lookup struct {
	cat  Catalog
	node string
}

func (l lookup) Keys() []objsync.Key { return l.cat.Keys(l.node) }

// Lookup returns the version hash only: the object is encoded when it is
// sent (see objects.send), so a reconcile over many objects encodes none
// of the unchanged ones.
func (l lookup) Lookup(key objsync.Key) (uint64, any, bool) {
	uid, rv, ok := l.cat.Version(l.node, key)
	if !ok {
		return 0, nil, false
	}
	return objsync.VersionHash(uid, rv), nil, true
}

// flush sends what the state machine decides after an event, publishes
// its messages awaiting an ack, and starts or stops the tick.
func (o *objects) flush(ctx context.Context, now time.Time) error {
	if err := o.send(ctx, o.st.Next(now, o.view)); err != nil {
		return err
	}
	o.inbox.pending.Store(int64(o.st.InFlight()))
	if need := o.needTick(); need != o.ticking {
		if need {
			o.tick.Reset(tickEvery)
		} else {
			o.tick.Stop()
		}
		o.ticking = need
	}
	return nil
}

// needTick says whether a tick has anything to do: a message awaits an
// ack (Tick resends it after ResendAfter), or the count of objects held
// has changed since it was last reported (reportHeld).
func (o *objects) needTick() bool {
	if o.st.InFlight() > 0 {
		return true
	}
	return o.c.d.sessions != nil && o.st.Live() && o.st.Held() != o.reported
}

func (o *objects) handle(ctx context.Context, m *message.Message) error {
	c := o.c
	switch m.Kind {
	case message.KindAck:
		o.st.OnAck(m.ReplyTo)
	case message.KindRefuse:
		c.d.metrics.edgeRefused.Inc()
		if l := c.limited("edge_refused"); l != nil {
			l.Warn("edge refused a message", "id", m.ReplyTo, "reason", truncateReason(string(m.Payload)))
		}
		o.st.OnRefused(m.ReplyTo)
	case message.KindSync:
		var p objsync.Sync
		if err := c.d.codec.UnmarshalValue(m.Payload, &p); err != nil {
			return c.refuse(ctx, m, "bad_sync", err)
		}
		if err := p.Validate(); err != nil {
			return c.refuse(ctx, m, "bad_sync", err)
		}
		switch p.Phase {
		case objsync.PhaseDigest:
			c.d.metrics.resyncs.Inc()
			o.digestAt = time.Now()
			c.log().Info("reconcile started", "edge_objects", p.Count, "buckets", len(p.Buckets))
			return o.send(ctx, o.st.OnDigest(p, o.view))
		case objsync.PhaseList:
			actions, err := o.st.OnList(p, o.view)
			switch {
			case errors.Is(err, ErrUnexpectedList):
				return c.refuse(ctx, m, "unexpected_list", err)
			case errors.Is(err, ErrListTooLong):
				return c.refuse(ctx, m, "list_too_long", err)
			case errors.Is(err, ErrBadList):
				return c.refuse(ctx, m, "bad_list", err)
			}
			return o.send(ctx, actions)
		default:
			return c.refuse(ctx, m, "bad_sync", fmt.Errorf("edge sent sync phase %d", p.Phase))
		}
	}
	return nil
}

// reportHeld tells Sessions how many objects the edge holds, once the
// sync is idle (reconciled, nothing queued or awaiting an ack), when the
// count changed, at most every heldReportEvery.
func (o *objects) reportHeld(now time.Time) {
	s := o.c.d.sessions
	if s == nil || !o.st.Live() || o.st.InFlight() > 0 || o.st.Queued() > 0 {
		return
	}
	held := o.st.Held()
	if held == o.reported || (o.reported >= 0 && now.Sub(o.reportedAt) < heldReportEvery) {
		return
	}
	o.reported, o.reportedAt = held, now
	s.Held(o.c.node, o.c.s.ID(), held)
}

// send sends the state machine's actions. An object over the frame limit
// is treated like one the edge refused: counted, logged, and not sent
// again until it changes; the session goes on.
func (o *objects) send(ctx context.Context, actions []Action) error {
	c := o.c
	for _, a := range actions {
		m := &message.Message{ID: a.ID, Node: c.node, Time: time.Now().UnixNano()}
		var kind string
		switch a.Kind {
		case SendObject:
			obj, ok := c.d.cat.Get(c.node, a.Key)
			if !ok {
				// Gone since the state machine looked: drop the flight and
				// let the key be evaluated again (it becomes a delete).
				o.st.OnRefused(a.ID)
				o.st.Changed(a.Key)
				continue
			}
			// If the object changed since the state machine looked, the
			// newer version goes out now; the catalog's notification of
			// that change re-queues the key, and the resend after the ack
			// is a harmless duplicate.
			m.Kind, m.Op, m.Resource, m.Version, m.Payload = message.KindEvent, message.OpUpsert, obj.Resource, obj.Version, obj.Data
			kind = "object"
		case SendDelete:
			m.Kind, m.Op = message.KindEvent, message.OpDelete
			m.Resource = message.Resource{Group: a.Key.Group, Kind: a.Key.Kind, Namespace: a.Key.Namespace, Name: a.Key.Name}
			kind = "delete"
		case SendWant, SendPrune, SendDone:
			var p objsync.Sync
			switch a.Kind {
			case SendWant:
				p, kind = objsync.Sync{Phase: objsync.PhaseWant, Buckets: a.Buckets, Sub: a.Sub}, "want"
			case SendPrune:
				p, kind = objsync.Sync{Phase: objsync.PhasePrune, Hashes: a.Hashes}, "prune"
				c.d.metrics.pruned.Add(float64(len(a.Hashes)))
			default:
				p, kind = objsync.Sync{Phase: objsync.PhaseDone}, "done"
			}
			payload, err := c.d.codec.Append(nil, &p)
			if err != nil {
				return fmt.Errorf("encode %s: %w", kind, err)
			}
			m.Kind, m.Payload = message.KindSync, payload
		}
		err := c.s.Send(ctx, m)
		if a.Kind == SendObject && errors.Is(err, message.ErrFrameTooLarge) {
			o.st.OnRefused(a.ID)
			c.d.metrics.refused.WithLabelValues("too_large").Inc()
			if l := c.limited("too_large"); l != nil {
				l.Warn("object too large to send", "resource", m.Resource.String(), "bytes", len(m.Payload), "err", err)
			}
			continue
		}
		if errors.Is(err, tunnel.ErrLargeMessageTimeout) {
			// Only this message was lost and the session goes on; its
			// flight stays, so the resend after ResendAfter covers it.
			if l := c.limited("large_send_timeout"); l != nil {
				l.Warn("large message not delivered in time", "kind", kind, "bytes", len(m.Payload), "err", err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("send %s to %s: %w", kind, c.node, err)
		}
		c.d.metrics.sent.WithLabelValues(kind).Inc()
		if a.Kind == SendDone {
			c.d.metrics.reconcileSeconds.Observe(time.Since(o.digestAt).Seconds())
			c.d.metrics.reconcileObjects.Observe(float64(a.Differences))
		}
	}
	return nil
}
