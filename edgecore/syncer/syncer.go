// Package syncer is EdgeCore's side of the sync protocol: on every session
// it tells the cloud what the edge holds (a digest of its store), applies
// the cloud's events and prunes in batches and acks them only after the
// batch is committed, delivers the edge's durable outbox of upstream
// writes, and carries certificate renewals and the pods' service-account
// token requests.
//
// The protocol logic is a pure state machine, Edge (state.go), made anew
// for each session: what it holds (the digest's bucket count, per key hash
// the id of the last event or prune applied, the events waiting for the
// store, the outbox items in the window or in back-off) lives only as long
// as the session. What outlasts a session is in the store. Serve is the
// thin loop around it that does the I/O: one receive path, the store's
// reads and writes, the sends. The syncer never talks to Kubernetes and
// makes no decision the state machine does not.
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
	"github.com/tetheredge/tether/common/ratelog"
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
	// OutboxWindow is how many upstream writes may await the cloud's
	// answer. Default 128.
	OutboxWindow int
	// RetryMin and RetryMax bound the back-off of an upstream write the
	// cloud answered with Retry: RetryMin after the first, doubling up to
	// RetryMax (or the cloud's hint if longer). Defaults 1s and 60s.
	RetryMin, RetryMax time.Duration
	// ResendAfter is how long an upstream write may go unanswered; then it
	// leaves the window and is sent again after its back-off, as if the
	// cloud had answered Retry. Default 30s.
	ResendAfter time.Duration
	// ListChunk is the most entries in one List message; a longer list is
	// sent in several, More set on all but the last. Default 1024 (about
	// 20 KiB), so that every List stays below the tunnel's large-message
	// threshold (32 KiB by default) and travels on the ordered control
	// stream: a larger one would go on its own QUIC stream and could
	// arrive after the last chunk. At most objsync.MaxEntries.
	ListChunk int
	// StoreRetryMin and StoreRetryMax bound the back-off after a failed
	// store read or write (busy, disk full), retried within the session.
	// Defaults 100ms and 10s.
	StoreRetryMin, StoreRetryMax time.Duration
}

func (c Config) withDefaults() Config {
	if c.MaxBatch <= 0 {
		c.MaxBatch = 512
	}
	if c.OutboxWindow <= 0 {
		c.OutboxWindow = 128
	}
	if c.RetryMin <= 0 {
		c.RetryMin = time.Second
	}
	if c.RetryMax <= 0 {
		c.RetryMax = time.Minute
	}
	if c.ResendAfter <= 0 {
		c.ResendAfter = 30 * time.Second
	}
	if c.StoreRetryMin <= 0 {
		c.StoreRetryMin = 100 * time.Millisecond
	}
	if c.StoreRetryMax <= 0 {
		c.StoreRetryMax = 10 * time.Second
	}
	if c.ListChunk <= 0 {
		c.ListChunk = 1024
	}
	c.ListChunk = min(c.ListChunk, objsync.MaxEntries)
	c.RetryMax = max(c.RetryMax, c.RetryMin)
	c.StoreRetryMax = max(c.StoreRetryMax, c.StoreRetryMin)
	return c
}

// Syncer keeps the edge store in step with the cloud.
type Syncer struct {
	store   Store
	cfg     Config
	codec   *message.Codec
	logger  *slog.Logger
	lim     *ratelog.Limiter
	outbox  chan struct{}
	metrics *metrics

	mu      sync.Mutex
	current *tunnel.Session                  // the live session, if any
	renewID uint64                           // last renewal request id
	waiting map[uint64]chan *message.Message // renewal requests awaiting an answer
}

// ErrOffline means there is no session to the cloud.
var ErrOffline = errors.New("syncer: not connected to the cloud")

type metrics struct {
	applied     prometheus.Counter
	batches     prometheus.Counter
	stale       prometheus.Counter
	pruned      prometheus.Counter
	overflow    prometheus.Counter
	refused     *prometheus.CounterVec
	storeErrors *prometheus.CounterVec
	upstream    *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		applied:  prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_edge_events_applied_total", Help: "Cloud events committed to the store."}),
		batches:  prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_edge_batches_total", Help: "Store transactions of applied events and prunes."}),
		stale:    prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_edge_stale_events_total", Help: "Cloud events (and prune hashes) acked but not applied: the edge had applied a newer message for the key."}),
		pruned:   prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_edge_pruned_total", Help: "Key hashes deleted by reconcile prunes."}),
		overflow: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_edge_events_overflow_total", Help: "Cloud events dropped unacked because too many waited for a failing store (the cloud sends them again)."}),
		refused:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_edge_refused_total", Help: "Cloud messages refused, by reason."}, []string{"reason"}),
		storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_edge_store_errors_total", Help: "Failed store operations of the syncer, retried within the session, by operation.",
		}, []string{"op"}),
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_edge_upstream_total", Help: "Upstream writes by result (acked, refused, retried, resent, too_large).",
		}, []string{"result"}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.applied, m.batches, m.stale, m.pruned, m.overflow, m.refused, m.storeErrors, m.upstream} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register syncer metrics: %w", err)
		}
	}
	return m, nil
}

// New returns a syncer over st. A nil logger discards logs; reg may be nil.
func New(st Store, cfg Config, logger *slog.Logger, reg prometheus.Registerer) (*Syncer, error) {
	if st == nil {
		return nil, errors.New("syncer: a store is required")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	return &Syncer{
		store: st, cfg: cfg.withDefaults(), codec: message.NewCodec(0),
		logger: logger.With("component", "syncer"), lim: ratelog.New(0, nil),
		outbox: make(chan struct{}, 1), metrics: m,
	}, nil
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

// Renew sends a certificate request over the live session and returns the
// cloud's answer: the new certificate, PEM. A refusal is an error.
func (s *Syncer) Renew(ctx context.Context, csrPEM []byte) ([]byte, error) {
	m, err := s.request(ctx, &message.Message{Kind: message.KindRenew, Payload: csrPEM})
	if err != nil {
		return nil, fmt.Errorf("renewal: %w", err)
	}
	if m.Kind != message.KindRenew {
		return nil, fmt.Errorf("renewal: the cloud answered %s: %s", m.Kind, reason(m.Payload))
	}
	return m.Payload, nil
}

// request sends m, a request answered by reply_to (a renewal or a token
// request), over the live session under a fresh request id and returns
// the cloud's answer.
func (s *Syncer) request(ctx context.Context, m *message.Message) (*message.Message, error) {
	s.mu.Lock()
	sess := s.current
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
	if sess == nil {
		return nil, ErrOffline
	}
	m.ID, m.Time = id, time.Now().UnixNano()
	if err := sess.Send(ctx, m); err != nil {
		return nil, fmt.Errorf("send %s request: %w", m.Kind, err)
	}
	select {
	case a := <-ch:
		return a, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-sess.Done():
		return nil, ErrOffline
	}
}

// answerRenewal hands a renewal answer to its waiter, if it still waits.
func (s *Syncer) answerRenewal(m *message.Message) {
	s.mu.Lock()
	ch := s.waiting[m.ReplyTo]
	s.mu.Unlock()
	if ch != nil {
		select {
		case ch <- m:
		default:
		}
	}
}

// Serve runs the protocol on one session until it or ctx ends. Store
// failures do not end it: they are retried within the session.
func (s *Syncer) Serve(ctx context.Context, sess *tunnel.Session) error {
	s.mu.Lock()
	s.current = sess
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.current == sess {
			s.current = nil
		}
		s.mu.Unlock()
	}()
	l := &loop{s: s, sess: sess, edge: NewEdge(s.cfg), logger: s.logger.With("session", sess.ID())}
	g, ctx := errgroup.WithContext(ctx)
	msgs := make(chan *message.Message, s.cfg.MaxBatch)
	g.Go(func() error { // the one receive path
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
	g.Go(func() error { return l.run(ctx, msgs) })
	err := g.Wait()
	if errors.Is(err, tunnel.ErrSessionClosed) || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
