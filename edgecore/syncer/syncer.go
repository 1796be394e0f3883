// Package syncer is EdgeCore's side of the sync protocol: on every session
// it tells the cloud what the edge holds (a digest of its store), applies
// the cloud's events in batches and acks them only after the batch is
// committed, and delivers the edge's durable outbox of upstream writes. It
// keeps no state of its own outside the store.
package syncer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tunnel"
)

// Store is what the syncer needs of the edge store.
type Store interface {
	Apply(ctx context.Context, changes []store.Change) error
	DeleteByKeyHash(ctx context.Context, hashes []uint64) ([]objsync.Key, error)
	Inventory(ctx context.Context) ([]objsync.Entry, error)
	Enqueue(ctx context.Context, item store.OutboxItem) (uint64, error)
	Pending(ctx context.Context, limit int) ([]store.OutboxItem, error)
	Done(ctx context.Context, key objsync.Key, seq uint64) error
}

// Config tunes a Syncer; zero values mean the defaults beside them.
type Config struct {
	// MaxBatch is the most events applied in one transaction. Default 512.
	MaxBatch int
	// OutboxWindow is how many upstream writes may await the cloud's ack.
	// Default 128.
	OutboxWindow int
}

// Syncer keeps the edge store in step with the cloud.
type Syncer struct {
	store   Store
	cfg     Config
	codec   *message.Codec
	logger  *slog.Logger
	outbox  chan struct{}
	metrics *metrics

	mu      sync.Mutex
	current *conn                            // the live session, if any
	renewID uint64                           // last renewal request id
	waiting map[uint64]chan *message.Message // renewal requests awaiting an answer
}

// renewIDBase starts the ids of renewal requests, far from outbox
// sequence numbers, so that the answers are never mistaken for acks.
const renewIDBase = 1 << 62

// ErrOffline means there is no session to the cloud.
var ErrOffline = errors.New("syncer: not connected to the cloud")

// Renew sends a certificate request over the live session and returns the
// cloud's answer: the new certificate, PEM.
func (s *Syncer) Renew(ctx context.Context, csrPEM []byte) ([]byte, error) {
	s.mu.Lock()
	c := s.current
	s.renewID++
	id := renewIDBase + s.renewID
	ch := make(chan *message.Message, 1)
	if s.waiting == nil {
		s.waiting = make(map[uint64]chan *message.Message)
	}
	s.waiting[id] = ch
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.waiting, id)
		s.mu.Unlock()
	}()
	if c == nil {
		return nil, ErrOffline
	}
	if err := c.sess.Send(ctx, &message.Message{ID: id, Kind: message.KindRenew, Time: time.Now().UnixNano(), Payload: csrPEM}); err != nil {
		return nil, fmt.Errorf("send renewal: %w", err)
	}
	select {
	case m := <-ch:
		if m.Kind == message.KindRefuse {
			return nil, fmt.Errorf("the cloud refused the renewal: %s", m.Payload)
		}
		return m.Payload, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.sess.Done():
		return nil, fmt.Errorf("renewal: %w", ErrOffline)
	}
}

// answerRenewal hands a renewal answer to its waiter; false if it is not one.
func (s *Syncer) answerRenewal(m *message.Message) bool {
	if m.ReplyTo < renewIDBase {
		return false
	}
	s.mu.Lock()
	ch := s.waiting[m.ReplyTo]
	s.mu.Unlock()
	if ch != nil {
		select {
		case ch <- m:
		default:
		}
	}
	return true
}

type metrics struct {
	applied  prometheus.Counter
	batches  prometheus.Counter
	refused  *prometheus.CounterVec
	upstream prometheus.Counter
}

// New returns a syncer over st. reg may be nil.
func New(st Store, cfg Config, logger *slog.Logger, reg prometheus.Registerer) *Syncer {
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 512
	}
	if cfg.OutboxWindow <= 0 {
		cfg.OutboxWindow = 128
	}
	m := &metrics{
		applied: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_edge_events_applied_total", Help: "Cloud events committed to the store."}),
		batches: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_edge_batches_total", Help: "Store transactions of applied events."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_edge_refused_total", Help: "Cloud messages refused, by reason."}, []string{"reason"}),
		upstream: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_edge_upstream_acked_total", Help: "Upstream writes the cloud confirmed.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.applied, m.batches, m.refused, m.upstream)
	}
	return &Syncer{store: st, cfg: cfg, codec: message.NewCodec(0), logger: logger.With("component", "syncer"), outbox: make(chan struct{}, 1), metrics: m}
}

// Publish queues an upstream write (node status, lease, pod status) in the
// durable outbox; it is delivered when a session is up, newest per object.
func (s *Syncer) Publish(ctx context.Context, item store.OutboxItem) error {
	if _, err := s.store.Enqueue(ctx, item); err != nil {
		return fmt.Errorf("publish %s: %w", item.Resource.String(), err)
	}
	select {
	case s.outbox <- struct{}{}:
	default:
	}
	return nil
}

// Serve runs the protocol on one session until it or ctx ends.
func (s *Syncer) Serve(ctx context.Context, sess *tunnel.Session) error {
	c := &conn{s: s, sess: sess, logger: s.logger.With("session", sess.ID())}
	s.mu.Lock()
	s.current = c
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.current == c {
			s.current = nil
		}
		s.mu.Unlock()
	}()
	g, ctx := errgroup.WithContext(ctx)
	msgs := make(chan *message.Message, s.cfg.MaxBatch)
	acks := make(chan *message.Message, 64)
	g.Go(func() error {
		defer close(msgs)
		for {
			m, err := sess.Recv(ctx)
			if err != nil {
				return err
			}
			select {
			case msgs <- m:
			case <-ctx.Done():
				return nil
			}
		}
	})
	g.Go(func() error {
		if err := c.sendDigest(ctx); err != nil {
			return err
		}
		return c.applyLoop(ctx, msgs, acks)
	})
	g.Go(func() error { return c.outboxLoop(ctx, acks) })
	err := g.Wait()
	if errors.Is(err, tunnel.ErrSessionClosed) || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

type conn struct {
	s      *Syncer
	sess   *tunnel.Session
	logger *slog.Logger
	nb     int // buckets of the digest sent on this session
}

func (c *conn) sendSync(ctx context.Context, p *objsync.Sync) error {
	payload, err := c.s.codec.Append(nil, p)
	if err != nil {
		return err
	}
	return c.sess.Send(ctx, &message.Message{Kind: message.KindSync, Time: time.Now().UnixNano(), Payload: payload})
}

func (c *conn) sendDigest(ctx context.Context) error {
	inv, err := c.s.store.Inventory(ctx)
	if err != nil {
		return fmt.Errorf("read inventory: %w", err)
	}
	c.nb = objsync.BucketCount(len(inv))
	d := objsync.NewDigest(c.nb)
	for _, e := range inv {
		d.Add(e)
	}
	c.logger.Info("reconcile: digest sent", "objects", len(inv), "buckets", c.nb)
	return c.sendSync(ctx, &objsync.Sync{Phase: objsync.PhaseDigest, Count: uint32(len(inv)), Buckets: d.Buckets})
}

func (c *conn) ack(ctx context.Context, id uint64) error {
	return c.sess.Send(ctx, &message.Message{Kind: message.KindAck, ReplyTo: id})
}

func (c *conn) refuse(ctx context.Context, m *message.Message, reason string, err error) error {
	c.logger.Warn("message from cloud refused", "kind", m.Kind.String(), "id", m.ID, "reason", reason, "err", err)
	c.s.metrics.refused.WithLabelValues(reason).Inc()
	return c.sess.Send(ctx, &message.Message{Kind: message.KindRefuse, ReplyTo: m.ID, Payload: []byte(err.Error())})
}

// applyLoop takes messages in arrival order. Consecutive events are applied
// as one transaction and acked after its commit.
func (c *conn) applyLoop(ctx context.Context, msgs <-chan *message.Message, acks chan<- *message.Message) error {
	var pending *message.Message
	for {
		m := pending
		pending = nil
		if m == nil {
			var ok bool
			select {
			case <-ctx.Done():
				return nil
			case m, ok = <-msgs:
				if !ok {
					return nil
				}
			}
		}
		if m.Kind != message.KindEvent {
			if err := c.handle(ctx, m, acks); err != nil {
				return err
			}
			continue
		}
		batch := []*message.Message{m}
	fill:
		for len(batch) < c.s.cfg.MaxBatch {
			select {
			case next, ok := <-msgs:
				if !ok {
					break fill
				}
				if next.Kind != message.KindEvent {
					pending = next
					break fill
				}
				batch = append(batch, next)
			default:
				break fill
			}
		}
		if err := c.applyBatch(ctx, batch); err != nil {
			return err
		}
	}
}

func (c *conn) applyBatch(ctx context.Context, batch []*message.Message) error {
	changes := make([]store.Change, 0, len(batch))
	ids := make([]uint64, 0, len(batch))
	for _, m := range batch {
		ch, err := toChange(m)
		if err != nil {
			if err := c.refuse(ctx, m, "bad_event", err); err != nil {
				return err
			}
			continue
		}
		changes = append(changes, ch)
		ids = append(ids, m.ID)
	}
	if len(changes) == 0 {
		return nil
	}
	if err := c.s.store.Apply(ctx, changes); err != nil {
		return fmt.Errorf("apply %d events: %w", len(changes), err)
	}
	c.s.metrics.batches.Inc()
	c.s.metrics.applied.Add(float64(len(changes)))
	for _, id := range ids {
		if err := c.ack(ctx, id); err != nil {
			return err
		}
	}
	return nil
}

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

func (c *conn) handle(ctx context.Context, m *message.Message, acks chan<- *message.Message) error {
	switch m.Kind {
	case message.KindSync:
		var p objsync.Sync
		if err := c.s.codec.UnmarshalValue(m.Payload, &p); err != nil {
			return c.refuse(ctx, m, "bad_sync", err)
		}
		if err := p.Validate(); err != nil {
			return c.refuse(ctx, m, "bad_sync", err)
		}
		switch p.Phase {
		case objsync.PhaseWant:
			return c.sendList(ctx, p.Buckets)
		case objsync.PhasePrune:
			removed, err := c.s.store.DeleteByKeyHash(ctx, p.Hashes)
			if err != nil {
				return fmt.Errorf("prune: %w", err)
			}
			c.logger.Info("reconcile: pruned objects the node no longer holds", "count", len(removed))
			return c.ack(ctx, m.ID)
		case objsync.PhaseDone:
			c.logger.Info("reconcile: cloud has queued every difference")
			return nil
		default:
			return c.refuse(ctx, m, "bad_sync", fmt.Errorf("cloud sent sync phase %d", p.Phase))
		}
	case message.KindRenew:
		if !c.s.answerRenewal(m) {
			return c.refuse(ctx, m, "unexpected_kind", errors.New("renewal answer without a request"))
		}
		return nil
	case message.KindAck, message.KindRefuse:
		if m.Kind == message.KindRefuse && c.s.answerRenewal(m) {
			return nil
		}
		select {
		case acks <- m:
		case <-ctx.Done():
		}
		return nil
	default:
		return c.refuse(ctx, m, "unexpected_kind", fmt.Errorf("cloud sent %s", m.Kind))
	}
}

func (c *conn) sendList(ctx context.Context, want []uint64) error {
	inv, err := c.s.store.Inventory(ctx)
	if err != nil {
		return fmt.Errorf("read inventory: %w", err)
	}
	wanted := make(map[int]bool, len(want))
	for _, b := range want {
		wanted[int(b)] = true
	}
	var entries []objsync.Entry
	for _, e := range inv {
		if wanted[objsync.Bucket(e.Key, c.nb)] {
			entries = append(entries, e)
		}
	}
	c.logger.Info("reconcile: list sent", "buckets", len(want), "entries", len(entries))
	return c.sendSync(ctx, &objsync.Sync{Phase: objsync.PhaseList, Entries: entries})
}

// outboxLoop sends pending upstream writes, at most OutboxWindow awaiting
// an ack, and removes each from the outbox when the cloud confirms it.
func (c *conn) outboxLoop(ctx context.Context, acks <-chan *message.Message) error {
	sent := make(map[uint64]objsync.Key)
	for {
		if len(sent) < c.s.cfg.OutboxWindow {
			items, err := c.s.store.Pending(ctx, c.s.cfg.OutboxWindow)
			if err != nil {
				return fmt.Errorf("read outbox: %w", err)
			}
			for _, it := range items {
				if _, ok := sent[it.Seq]; ok || len(sent) >= c.s.cfg.OutboxWindow {
					continue
				}
				m := &message.Message{ID: it.Seq, Kind: message.KindUpstream, Op: it.Op, Resource: it.Resource, Time: time.Now().UnixNano(), Payload: it.Data}
				if err := c.sess.Send(ctx, m); err != nil {
					return err
				}
				sent[it.Seq] = objsync.KeyOf(it.Resource)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-c.s.outbox:
		case a := <-acks:
			key, ok := sent[a.ReplyTo]
			if !ok {
				continue
			}
			delete(sent, a.ReplyTo)
			if a.Kind == message.KindRefuse {
				c.logger.Warn("cloud refused an upstream write; dropping it", "resource", key.String(), "reason", string(a.Payload))
			} else {
				c.s.metrics.upstream.Inc()
			}
			if err := c.s.store.Done(ctx, key, a.ReplyTo); err != nil {
				return fmt.Errorf("outbox done: %w", err)
			}
		}
	}
}
