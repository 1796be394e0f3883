package syncer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/tunnel"
)

// loop is the I/O around one session's state machine. It runs on one
// goroutine: it feeds the machine what it receives, the outbox signal and
// its deadlines, and does the actions the machine returns, feeding the
// store's answers back.
type loop struct {
	s      *Syncer
	sess   *tunnel.Session
	edge   *Edge
	logger *slog.Logger
	last   Stats // what the metrics have counted so far
}

func (l *loop) run(ctx context.Context, msgs <-chan *message.Message) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	if err := l.do(ctx, l.edge.Start(time.Now())); err != nil {
		return err
	}
	for {
		if t, ok := l.edge.Deadline(); ok {
			timer.Reset(time.Until(t))
		} else {
			timer.Stop()
		}
		var acts []Action
		select {
		case <-ctx.Done():
			return nil
		case m, ok := <-msgs:
			if !ok {
				return nil
			}
			acts = l.edge.Receive(time.Now(), m)
			// Take what else has arrived, so that consecutive events share
			// one transaction.
		drain:
			for range l.s.cfg.MaxBatch {
				select {
				case m, ok := <-msgs:
					if !ok {
						break drain
					}
					acts = append(acts, l.edge.Receive(time.Now(), m)...)
				default:
					break drain
				}
			}
			acts = append(acts, l.edge.Flush(time.Now())...)
		case <-l.s.outbox:
			acts = l.edge.OutboxChanged(time.Now())
		case now := <-timer.C:
			acts = l.edge.Tick(now)
		}
		if err := l.do(ctx, acts); err != nil {
			return err
		}
	}
}

// do runs actions in order; the machine's answer to one runs before the
// rest. The metrics catch up with the machine before each action, so
// that whatever the action makes visible (an ack the cloud reads, an
// outbox row gone) is never ahead of the counters.
func (l *loop) do(ctx context.Context, acts []Action) error {
	for len(acts) > 0 {
		l.count()
		more, err := l.exec(ctx, acts[0])
		if err != nil {
			return err
		}
		acts = append(more, acts[1:]...)
	}
	l.count()
	return nil
}

func (l *loop) exec(ctx context.Context, a Action) ([]Action, error) {
	st, e := l.s.store, l.edge
	switch a.Kind {
	case ReadInventory:
		inv, err := st.Inventory(ctx)
		if err != nil {
			return l.storeFailed(ctx, "inventory", err, e.OnInventoryFailed)
		}
		return e.OnInventory(time.Now(), inv), nil
	case SendSync:
		return nil, l.sendSync(ctx, a)
	case ApplyChanges:
		if err := st.Apply(ctx, a.Changes); err != nil {
			return l.storeFailed(ctx, "apply", err, func(now time.Time) []Action { return e.OnCommitFailed(now, err) })
		}
		return e.OnCommitted(time.Now()), nil
	case PruneHashes:
		removed, err := st.DeleteByKeyHash(ctx, a.Hashes)
		if err != nil {
			return l.storeFailed(ctx, "prune", err, func(now time.Time) []Action { return e.OnCommitFailed(now, err) })
		}
		l.logger.Info("reconcile: pruned objects the node no longer holds", "hashes", len(a.Hashes), "removed", len(removed))
		return e.OnCommitted(time.Now()), nil
	case SendAck:
		return nil, l.sess.Send(ctx, &message.Message{Kind: message.KindAck, ReplyTo: a.ReplyTo})
	case SendRefuse:
		l.s.metrics.refused.WithLabelValues(a.Reason).Inc()
		if ok, suppressed := l.s.lim.Allow("refuse:" + a.Reason); ok {
			l.logger.Warn("message from cloud refused", "id", a.ReplyTo, "reason", a.Reason, "err", a.Detail, "suppressed", suppressed)
		}
		return nil, l.sess.Send(ctx, &message.Message{Kind: message.KindRefuse, ReplyTo: a.ReplyTo, Time: time.Now().UnixNano(), Payload: []byte(a.Detail)})
	case ReadOutbox:
		items, err := st.Pending(ctx, a.Limit)
		if err != nil {
			return l.storeFailed(ctx, "outbox_read", err, e.OnOutboxFailed)
		}
		return e.OnOutbox(time.Now(), items), nil
	case SendUpstream:
		it := a.Item
		err := l.sess.Send(ctx, &message.Message{ID: it.Seq, Kind: message.KindUpstream, Op: it.Op, Resource: it.Resource, Time: time.Now().UnixNano(), Payload: it.Data})
		if errors.Is(err, message.ErrFrameTooLarge) {
			return e.OnTooLarge(time.Now(), it.Seq), nil
		}
		return nil, err
	case OutboxDone:
		l.outboxDone(ctx, a)
		return nil, ctx.Err()
	case DeliverRenewal:
		l.s.answerRenewal(a.Msg)
	case Report:
		if ok, suppressed := l.s.lim.Allow(a.Reason); ok {
			l.logger.Warn("cloud refused a message", "reason", a.Detail, "suppressed", suppressed)
		}
	case Reconciled:
		l.logger.Info("reconcile: cloud has queued every difference")
	}
	return nil, nil
}

func (l *loop) sendSync(ctx context.Context, a Action) error {
	payload, err := l.s.codec.Append(nil, a.Sync)
	if err != nil {
		return fmt.Errorf("encode sync: %w", err)
	}
	if a.Sync.Phase == objsync.PhaseDigest {
		l.logger.Info("reconcile: digest sent", "objects", a.Sync.Count, "buckets", len(a.Sync.Buckets))
	} else {
		l.logger.Info("reconcile: list sent", "entries", len(a.Sync.Entries), "more", a.Sync.More)
	}
	return l.sess.Send(ctx, &message.Message{Kind: message.KindSync, Time: time.Now().UnixNano(), Payload: payload})
}

// storeFailed counts and logs a failed store operation and tells the
// machine, which retries it later. When ctx has ended the failure is the
// session's end, not the store's.
func (l *loop) storeFailed(ctx context.Context, op string, err error, tell func(time.Time) []Action) ([]Action, error) {
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	l.s.metrics.storeErrors.WithLabelValues(op).Inc()
	if ok, suppressed := l.s.lim.Allow("store:" + op); ok {
		l.logger.Warn("store operation failed; retrying", "op", op, "err", err, "suppressed", suppressed)
	}
	return tell(time.Now()), nil
}

func (l *loop) outboxDone(ctx context.Context, a Action) {
	it := a.Item
	switch a.Outcome {
	case Refused:
		if ok, suppressed := l.s.lim.Allow("upstream_refused:" + it.Key().String()); ok {
			l.logger.Warn("cloud refused an upstream write; dropping it", "resource", it.Resource.String(), "reason", a.Detail, "suppressed", suppressed)
		}
	case TooLarge:
		if ok, suppressed := l.s.lim.Allow("upstream_too_large:" + it.Key().String()); ok {
			l.logger.Warn("upstream write exceeds the frame limit; dropping it", "resource", it.Resource.String(), "bytes", len(it.Data), "suppressed", suppressed)
		}
	}
	if err := l.s.store.Done(ctx, it.Key(), it.Seq); err != nil && ctx.Err() == nil {
		// The item stays in the outbox and is sent again: a duplicate
		// the cloud tolerates.
		l.s.metrics.storeErrors.WithLabelValues("outbox_done").Inc()
		if ok, suppressed := l.s.lim.Allow("store:outbox_done"); ok {
			l.logger.Warn("store operation failed; the item will be sent again", "op", "outbox_done", "err", err, "suppressed", suppressed)
		}
	}
}

// count adds what the machine counted since the last call to the metrics.
func (l *loop) count() {
	now, m := l.edge.Stats(), l.s.metrics
	add := func(c interface{ Add(float64) }, cur, prev int) {
		if cur > prev {
			c.Add(float64(cur - prev))
		}
	}
	add(m.applied, now.Applied, l.last.Applied)
	add(m.batches, now.Batches, l.last.Batches)
	add(m.stale, now.Stale, l.last.Stale)
	add(m.pruned, now.Pruned, l.last.Pruned)
	add(m.overflow, now.Overflow, l.last.Overflow)
	add(m.upstream.WithLabelValues("acked"), now.UpstreamAcked, l.last.UpstreamAcked)
	add(m.upstream.WithLabelValues("refused"), now.UpstreamRefused, l.last.UpstreamRefused)
	add(m.upstream.WithLabelValues("retried"), now.UpstreamRetried, l.last.UpstreamRetried)
	add(m.upstream.WithLabelValues("resent"), now.UpstreamResent, l.last.UpstreamResent)
	add(m.upstream.WithLabelValues("too_large"), now.UpstreamTooLarge, l.last.UpstreamTooLarge)
	l.last = now
}
