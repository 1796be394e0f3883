package dispatch

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/tunnel"
)

// Catalog is the informer cache as the dispatcher reads it.
type Catalog interface {
	Keys(node string) []objsync.Key
	// Version is cheap (no encoding): the reconcile calls it for every key.
	Version(node string, key objsync.Key) (uid, resourceVersion string, ok bool)
	// Get encodes the object; it is called only for objects being sent.
	Get(node string, key objsync.Key) (catalog.Object, bool)
}

// Upstream writes what an edge asks the cloud to write on its behalf. Its
// error decides the answer (errors.go): nil is acked, an error wrapping
// ErrForbidden or ErrRejected is refused for good, any other error is
// answered with a Retry (with the API server's delay when it gave one).
type Upstream interface {
	Apply(ctx context.Context, node string, m *message.Message) error
}

// Settler is the optional capability of an Upstream that brings a node's
// Node up to date with what the operator set (labels, taints) when its
// session starts.
type Settler interface {
	Settle(ctx context.Context, node string) error
}

// Renewer signs a new certificate for a node whose session presents the
// certificate with currentSerial. Errors are refusals, told to the edge.
type Renewer interface {
	Renew(ctx context.Context, node, currentSerial string, csrPEM []byte) (*x509.Certificate, error)
}

// Tokens issues service-account tokens for the pods of a node (a
// KindRenew naming a message.TokenResource): the answer's payload, a
// message.Token. Its error decides the answer as Upstream's does.
type Tokens interface {
	Token(ctx context.Context, node string, m *message.Message) ([]byte, error)
}

// Sessions is told where each node's sessions are and how many objects
// the node holds (after the reconcile, then when the count changed, at
// most every heldReportEvery), for the EdgeNode's status
// (edgenode.ConnectionWriter). Its methods must not block.
type Sessions interface {
	Started(node, session string, transport tunnel.Transport, remote net.Addr, at time.Time)
	Held(node, session string, objects int)
	Ended(node, session string)
}

// Deps are the dispatcher's collaborators. Catalog and Upstream are
// required. Renewer may be nil: renewals are then refused. Tokens may be
// nil: token requests are then refused. Sessions may be nil.
type Deps struct {
	Catalog  Catalog
	Upstream Upstream
	Renewer  Renewer
	Tokens   Tokens
	Sessions Sessions
}

// Dispatcher serves the sync protocol on every edge session: one loop per
// connected node that receives its messages, routing each by kind to the
// handler of its concern (objects.go: object sync; upstream.go: upstream
// writes; renew.go: certificate renewal), fed by the catalog's change
// notifications.
type Dispatcher struct {
	cat      Catalog
	upstream Upstream
	renewer  Renewer
	tokens   Tokens
	sessions Sessions
	cfg      Config
	codec    *message.Codec
	logger   *slog.Logger
	logLim   *ratelog.Limiter
	metrics  *metrics

	mu    sync.Mutex
	nodes map[string]*inbox
}

type metrics struct {
	sent        *prometheus.CounterVec
	refused     *prometheus.CounterVec
	edgeRefused prometheus.Counter
	resyncs     prometheus.Counter
	pruned      prometheus.Counter
	upstream    *prometheus.CounterVec
	// acksPending sums, at each scrape, the sessions' messages awaiting an
	// ack (each session's loop publishes its state machine's InFlight).
	acksPending      prometheus.GaugeFunc
	reconcileSeconds prometheus.Histogram
	reconcileObjects prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer, acksPending func() float64) (*metrics, error) {
	m := &metrics{
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_sync_messages_sent_total", Help: "Sync messages sent to edges, by kind (object, delete, want, prune, done).",
		}, []string{"kind"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_sync_refused_total", Help: "Messages the cloud refused, from edges or to send (too_large), by reason.",
		}, []string{"reason"}),
		edgeRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_sync_edge_refused_total", Help: "Messages edges refused (their reason is logged).",
		}),
		resyncs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_sync_reconciles_total", Help: "Reconciles started (edge digests received).",
		}),
		pruned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_sync_pruned_total", Help: "Objects edges were told to delete by a reconcile.",
		}),
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_upstream_writes_total", Help: "Upstream writes from edges, by answer: ok, forbidden, rejected (refused); retry, throttled, busy (Retry).",
		}, []string{"result"}),
		acksPending: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tether_sync_acks_pending", Help: "Objects, deletes and prunes sent to edges that await their ack, over all sessions.",
		}, acksPending),
		reconcileSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tether_sync_reconcile_seconds", Help: "From an edge's digest to the cloud's Done: every difference found and queued.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}),
		reconcileObjects: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tether_sync_reconcile_objects", Help: "Objects a reconcile found missing or out of date at the edge, plus the objects it pruned.",
			Buckets: []float64{0, 1, 10, 100, 1000, 10000, 100000},
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.sent, m.refused, m.edgeRefused, m.resyncs, m.pruned, m.upstream, m.acksPending, m.reconcileSeconds, m.reconcileObjects} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register dispatch metrics: %w", err)
		}
	}
	return m, nil
}

// New returns a dispatcher. logger may be nil (discard); reg may be nil
// (metrics not exported).
func New(deps Deps, cfg Config, logger *slog.Logger, reg prometheus.Registerer) (*Dispatcher, error) {
	if deps.Catalog == nil || deps.Upstream == nil {
		return nil, errors.New("dispatch: Catalog and Upstream are required")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	d := &Dispatcher{
		cat:      deps.Catalog,
		upstream: deps.Upstream,
		renewer:  deps.Renewer,
		tokens:   deps.Tokens,
		sessions: deps.Sessions,
		cfg:      cfg.withDefaults(),
		codec:    message.NewCodec(0),
		logger:   logger.With("component", "dispatch"),
		logLim:   ratelog.New(0, nil),
		nodes:    make(map[string]*inbox),
	}
	m, err := newMetrics(reg, d.acksPending)
	if err != nil {
		return nil, err
	}
	d.metrics = m
	return d, nil
}

// acksPending sums the in-flight counts the sessions published: a session
// that ended is out of nodes, so its messages no longer count.
func (d *Dispatcher) acksPending() float64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	var n int64
	for _, b := range d.nodes {
		n += b.pending.Load()
	}
	return float64(n)
}

// inbox collects the keys that changed for one connected node: a set, so
// it never holds more than the node's keys however fast things change.
type inbox struct {
	mu     sync.Mutex
	keys   map[objsync.Key]struct{}
	signal chan struct{}
	// pending is the session's messages awaiting an ack, as its objects
	// loop last saw them (the state machine is the loop's alone).
	pending atomic.Int64
}

func (b *inbox) add(k objsync.Key) {
	b.mu.Lock()
	if b.keys == nil {
		b.keys = make(map[objsync.Key]struct{})
	}
	b.keys[k] = struct{}{}
	b.mu.Unlock()
	select {
	case b.signal <- struct{}{}:
	default:
	}
}

func (b *inbox) drain() []objsync.Key {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]objsync.Key, 0, len(b.keys))
	for k := range b.keys {
		out = append(out, k)
	}
	b.keys = nil // an emptied map keeps its memory; the next add makes one
	return out
}

// Notify tells the dispatcher that key may have changed for node. It is the
// catalog's subscription callback: cheap, never blocks. Nodes without a
// session are skipped: their reconcile on reconnect finds the change.
func (d *Dispatcher) Notify(node string, key objsync.Key) {
	d.mu.Lock()
	b := d.nodes[node]
	d.mu.Unlock()
	if b != nil {
		b.add(key)
	}
}

// settleTimeout bounds the Settler's write at a session's start; a failed
// one is tried again at the next session or registration.
const settleTimeout = 10 * time.Second

// Serve runs the sync protocol on one node's session until the session or
// ctx ends. The caller guarantees one session per node at a time.
func (d *Dispatcher) Serve(ctx context.Context, s *tunnel.Session) error {
	node := s.Peer().Node
	b := &inbox{signal: make(chan struct{}, 1)}
	d.mu.Lock()
	d.nodes[node] = b
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		if d.nodes[node] == b {
			delete(d.nodes, node)
		}
		d.mu.Unlock()
	}()
	if d.sessions != nil {
		d.sessions.Started(node, s.ID(), s.Transport(), s.RemoteAddr(), time.Now())
		defer d.sessions.Ended(node, s.ID())
	}
	c := &conn{d: d, s: s, node: node}
	c.objects = newObjects(c, b)
	c.upstream = newUpstreamHandler(c)
	c.renewal = newRenewal(c)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.g, ctx = errgroup.WithContext(ctx)
	if st, ok := d.upstream.(Settler); ok {
		c.spawn(ctx, func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, settleTimeout)
			defer cancel()
			if err := st.Settle(ctx, node); err != nil && ctx.Err() == nil {
				if l := c.limited("settle"); l != nil {
					l.Warn("cannot bring the node's Node up to date with its EdgeNode", "err", err)
				}
			}
			return nil
		})
	}
	err := c.run(ctx)
	cancel() // the lanes' writes are for this session only
	if werr := c.g.Wait(); err == nil {
		err = werr // a lane failed, which ended run
	}
	if errors.Is(err, tunnel.ErrSessionClosed) || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// conn is one node's session: the receive path and the answers every
// handler shares.
//
// A session holds one goroutine while idle, Serve's own, running run.
// The lanes of upstream writes and renewals start a goroutine in g when
// work arrives, and it exits when their queue is empty.
type conn struct {
	d    *Dispatcher
	s    *tunnel.Session
	node string
	g    *errgroup.Group // the lanes' goroutines; waited for before Serve returns

	objects  *objects
	upstream *upstreamHandler
	renewal  *renewal
}

// log returns the session's logger, built for each use rather than kept
// by every idle session (a handler clone each): a session logs rarely,
// and its warnings are rate-limited.
func (c *conn) log() *slog.Logger {
	return c.d.logger.With("node", c.node, "session", c.s.ID())
}

// spawn runs f in the session's group. Only run's goroutine calls it
// (through route), before Serve waits for the group.
func (c *conn) spawn(ctx context.Context, f func(context.Context) error) {
	c.g.Go(func() error { return f(ctx) })
}

// run is the session's one loop, on Serve's goroutine. It takes the
// edge's messages as they arrive and routes each to the handler of its
// kind, and runs object sync between them: the catalog's changes, the
// ticks that resend unacked messages, what the state machine decides to
// send. Upstream writes and renewals, which wait on the API server, are
// handed to lanes that never block it, so a slow write never holds up
// acks and sync. A send that waits for room in the session's send queue
// holds the loop, and with it the reading of the edge's messages: that is
// the back-pressure on an edge that does not read.
func (c *conn) run(ctx context.Context) error {
	o := c.objects
	defer o.tick.Stop()
	for {
		now := time.Now()
		select {
		case <-ctx.Done():
			return nil
		case <-c.s.Ready():
			m, err := c.s.TryRecv()
			if err != nil {
				return err
			}
			if m == nil {
				continue
			}
			if err := c.route(ctx, m); err != nil {
				return err
			}
		case <-o.inbox.signal:
			for _, k := range o.inbox.drain() {
				o.st.Changed(k)
			}
		case now = <-o.tick.C:
			o.st.Tick(now)
			o.reportHeld(now)
		}
		if err := o.flush(ctx, now); err != nil {
			return err
		}
	}
}

// route checks what every message must satisfy and hands it to the
// handler of its kind.
func (c *conn) route(ctx context.Context, m *message.Message) error {
	if m.Node != "" && m.Node != c.node {
		return c.refuse(ctx, m, "node_mismatch", fmt.Errorf("message names node %q, session belongs to %q", m.Node, c.node))
	}
	switch m.Kind {
	case message.KindAck, message.KindRefuse, message.KindSync:
		return c.objects.handle(ctx, m)
	case message.KindUpstream:
		return c.upstream.offer(ctx, m)
	case message.KindRenew:
		if message.IsTokenRequest(m) {
			// A token request is a write on the node's behalf: the
			// session's upstream rate and queue bound it (tokens.go).
			return c.upstream.offer(ctx, m)
		}
		return c.renewal.offer(ctx, m)
	default:
		return c.refuse(ctx, m, "unexpected_kind", fmt.Errorf("edge sent %s", m.Kind))
	}
}

// limited returns the session's logger, marked with the cause and the
// number of its occurrences suppressed since, when cause may be logged now
// (once per minute per node and cause), else nil. Callers count every
// occurrence in metrics.
func (c *conn) limited(cause string) *slog.Logger {
	ok, suppressed := c.d.logLim.Allow(c.node + " " + cause)
	if !ok {
		return nil
	}
	return c.log().With("cause", cause, "suppressed", suppressed)
}

// maxReason bounds the reason carried in a Refuse or Retry.
const maxReason = 512

func truncateReason(s string) string {
	if len(s) <= maxReason {
		return s
	}
	s = s[:maxReason]
	for !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// refuse answers m with a final KindRefuse, counted by reason and logged
// rate-limited.
func (c *conn) refuse(ctx context.Context, m *message.Message, reason string, err error) error {
	c.d.metrics.refused.WithLabelValues(reason).Inc()
	if l := c.limited(reason); l != nil {
		l.Warn("message from edge refused", "kind", m.Kind.String(), "id", m.ID, "resource", m.Resource.String(), "err", err)
	}
	return c.answer(ctx, m, message.KindRefuse, []byte(truncateReason(err.Error())))
}

// retry answers m with a KindRetry: not applied, send it again, not before
// after.
func (c *conn) retry(ctx context.Context, m *message.Message, after time.Duration, reason string) error {
	ms := (after + time.Millisecond - 1) / time.Millisecond
	p := message.Retry{AfterMillis: uint32(min(ms, 1<<32-1)), Reason: truncateReason(reason)}
	payload, err := c.d.codec.Append(nil, &p)
	if err != nil {
		return fmt.Errorf("encode retry: %w", err)
	}
	return c.answer(ctx, m, message.KindRetry, payload)
}

func (c *conn) answer(ctx context.Context, m *message.Message, kind message.Kind, payload []byte) error {
	return c.s.Send(ctx, &message.Message{Kind: kind, ReplyTo: m.ID, Node: c.node, Time: time.Now().UnixNano(), Payload: payload})
}
