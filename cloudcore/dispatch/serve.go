package dispatch

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
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

// Upstream writes what an edge asks the cloud to write on its behalf. It
// returns an error wrapping ErrForbidden when the node may not make that
// write.
type Upstream interface {
	Apply(ctx context.Context, node string, m *message.Message) error
}

// Renewer signs a new certificate for a node whose session presents the
// certificate with currentSerial. Errors are refusals, told to the edge.
type Renewer interface {
	Renew(ctx context.Context, node, currentSerial string, csrPEM []byte) (*x509.Certificate, error)
}

// Deps are the dispatcher's collaborators. Renewer may be nil: renewals are
// then refused.
type Deps struct {
	Catalog  Catalog
	Upstream Upstream
	Renewer  Renewer
}

// Dispatcher serves the sync protocol on every edge session: one loop per
// connected node, fed by the catalog's change notifications.
type Dispatcher struct {
	cat      Catalog
	upstream Upstream
	renewer  Renewer
	cfg      Config
	codec    *message.Codec
	logger   *slog.Logger
	metrics  *metrics

	mu    sync.Mutex
	nodes map[string]*inbox
}

type metrics struct {
	sent     *prometheus.CounterVec
	refused  *prometheus.CounterVec
	resyncs  prometheus.Counter
	pruned   prometheus.Counter
	upstream *prometheus.CounterVec
}

// New returns a dispatcher. reg may be nil.
func New(deps Deps, cfg Config, logger *slog.Logger, reg prometheus.Registerer) *Dispatcher {
	m := &metrics{
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_sync_messages_sent_total", Help: "Sync messages sent to edges, by kind (object, delete, want, prune, done).",
		}, []string{"kind"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_sync_refused_total", Help: "Messages from edges refused, by reason.",
		}, []string{"reason"}),
		resyncs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_sync_reconciles_total", Help: "Reconciles started (edge digests received).",
		}),
		pruned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_sync_pruned_total", Help: "Objects edges were told to delete by a reconcile.",
		}),
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_upstream_writes_total", Help: "Upstream writes from edges, by result (ok, forbidden, failed).",
		}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.sent, m.refused, m.resyncs, m.pruned, m.upstream)
	}
	return &Dispatcher{
		cat:      deps.Catalog,
		upstream: deps.Upstream,
		renewer:  deps.Renewer,
		cfg:      cfg.withDefaults(),
		codec:    message.NewCodec(0),
		logger:   logger.With("component", "dispatch"),
		metrics:  m,
		nodes:    make(map[string]*inbox),
	}
}

// inbox collects the keys that changed for one connected node: a set, so
// it never holds more than the node's keys however fast things change.
type inbox struct {
	mu     sync.Mutex
	keys   map[objsync.Key]struct{}
	signal chan struct{}
}

func (b *inbox) add(k objsync.Key) {
	b.mu.Lock()
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
	clear(b.keys)
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

// lookup is one node's view of the catalog.
type lookup struct {
	cat  Catalog
	node string
}

func (l lookup) Keys() []objsync.Key { return l.cat.Keys(l.node) }

// Lookup returns the version hash only: the object is encoded when it is
// sent (see conn.send), so a reconcile over many objects encodes none of
// the unchanged ones.
func (l lookup) Lookup(key objsync.Key) (uint64, any, bool) {
	uid, rv, ok := l.cat.Version(l.node, key)
	if !ok {
		return 0, nil, false
	}
	return objsync.VersionHash(uid, rv), nil, true
}

// Serve runs the sync protocol on one node's session until the session or
// ctx ends. The caller guarantees one session per node at a time.
func (d *Dispatcher) Serve(ctx context.Context, s *tunnel.Session) error {
	node := s.Peer().Node
	b := &inbox{keys: make(map[objsync.Key]struct{}), signal: make(chan struct{}, 1)}
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
	c := &conn{d: d, s: s, node: node, st: NewNode(d.cfg), view: lookup{d.cat, node}, logger: d.logger.With("node", node, "session", s.ID())}
	g, ctx := errgroup.WithContext(ctx)
	msgs := make(chan *message.Message, 64)
	ups := make(chan *message.Message, 64)
	g.Go(func() error {
		defer close(msgs)
		for {
			m, err := s.Recv(ctx)
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
	g.Go(func() error { return c.upstreamLoop(ctx, ups) })
	g.Go(func() error { return c.loop(ctx, b, msgs, ups) })
	err := g.Wait()
	if errors.Is(err, tunnel.ErrSessionClosed) || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// conn is the I/O around one node's state machine.
type conn struct {
	d      *Dispatcher
	s      *tunnel.Session
	node   string
	st     *Node
	view   lookup
	logger *slog.Logger
}

func (c *conn) loop(ctx context.Context, b *inbox, msgs <-chan *message.Message, ups chan<- *message.Message) error {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		now := time.Now()
		select {
		case <-ctx.Done():
			return nil
		case m, ok := <-msgs:
			if !ok {
				return nil
			}
			if err := c.handle(ctx, m, ups); err != nil {
				return err
			}
		case <-b.signal:
			for _, k := range b.drain() {
				c.st.Changed(k)
			}
		case now = <-tick.C:
			c.st.Tick(now)
		}
		if err := c.send(ctx, c.st.Next(now, c.view)); err != nil {
			return err
		}
	}
}

func (c *conn) refuse(ctx context.Context, m *message.Message, reason string, err error) error {
	c.logger.Warn("message from edge refused", "kind", m.Kind.String(), "id", m.ID, "reason", reason, "err", err)
	c.d.metrics.refused.WithLabelValues(reason).Inc()
	return c.s.Send(ctx, &message.Message{Kind: message.KindRefuse, ReplyTo: m.ID, Node: c.node, Time: time.Now().UnixNano(), Payload: []byte(err.Error())})
}

func (c *conn) handle(ctx context.Context, m *message.Message, ups chan<- *message.Message) error {
	if m.Node != "" && m.Node != c.node {
		return c.refuse(ctx, m, "node_mismatch", fmt.Errorf("message names node %q, session belongs to %q", m.Node, c.node))
	}
	switch m.Kind {
	case message.KindAck:
		c.st.OnAck(m.ReplyTo)
	case message.KindRefuse:
		c.logger.Warn("edge refused a message", "id", m.ReplyTo, "reason", string(m.Payload))
		c.st.OnRefused(m.ReplyTo)
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
			c.logger.Info("reconcile started", "edge_objects", p.Count, "buckets", len(p.Buckets))
			c.st = NewNode(c.d.cfg) // a new digest starts over
			return c.send(ctx, c.st.OnDigest(p, c.view))
		case objsync.PhaseList:
			return c.send(ctx, c.st.OnList(p, c.view))
		default:
			return c.refuse(ctx, m, "bad_sync", fmt.Errorf("edge sent sync phase %d", p.Phase))
		}
	case message.KindUpstream, message.KindRenew:
		select {
		case ups <- m:
		case <-ctx.Done():
		}
	default:
		return c.refuse(ctx, m, "unexpected_kind", fmt.Errorf("edge sent %s", m.Kind))
	}
	return nil
}

func (c *conn) upstreamLoop(ctx context.Context, ups <-chan *message.Message) error {
	for {
		var m *message.Message
		select {
		case <-ctx.Done():
			return nil
		case m = <-ups:
		}
		if m.Kind == message.KindRenew {
			if err := c.renew(ctx, m); err != nil {
				return err
			}
			continue
		}
		err := c.d.upstream.Apply(ctx, c.node, m)
		switch {
		case err == nil:
			c.d.metrics.upstream.WithLabelValues("ok").Inc()
			if err := c.s.Send(ctx, &message.Message{Kind: message.KindAck, ReplyTo: m.ID, Node: c.node, Time: time.Now().UnixNano()}); err != nil {
				return err
			}
		case errors.Is(err, ErrForbidden):
			c.d.metrics.upstream.WithLabelValues("forbidden").Inc()
			if err := c.refuse(ctx, m, "forbidden", err); err != nil {
				return err
			}
		default:
			// The write may succeed later: no ack, so the edge keeps it in
			// its outbox and sends it again on the next session.
			c.d.metrics.upstream.WithLabelValues("failed").Inc()
			c.logger.Warn("upstream write failed", "resource", m.Resource.String(), "err", err)
		}
	}
}

// renew answers a certificate renewal over the session.
func (c *conn) renew(ctx context.Context, m *message.Message) error {
	if c.d.renewer == nil {
		return c.refuse(ctx, m, "renew_refused", errors.New("this cloud does not renew certificates"))
	}
	cert, err := c.d.renewer.Renew(ctx, c.node, c.s.Peer().Serial, m.Payload)
	if err != nil {
		return c.refuse(ctx, m, "renew_refused", err)
	}
	c.logger.Info("certificate renewed", "serial", cert.SerialNumber.Text(16), "not_after", cert.NotAfter)
	return c.s.Send(ctx, &message.Message{Kind: message.KindRenew, ReplyTo: m.ID, Node: c.node, Time: time.Now().UnixNano(),
		Payload: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})})
}

func (c *conn) send(ctx context.Context, actions []Action) error {
	for _, a := range actions {
		m := &message.Message{ID: a.ID, Node: c.node, Time: time.Now().UnixNano()}
		var kind string
		switch a.Kind {
		case SendObject:
			o, ok := c.d.cat.Get(c.node, a.Key)
			if !ok {
				// Gone since the state machine looked: drop the flight and
				// let the key be evaluated again (it becomes a delete).
				c.st.OnRefused(a.ID)
				c.st.Changed(a.Key)
				continue
			}
			// If the object changed since the state machine looked, the
			// newer version goes out now; the catalog's notification of
			// that change re-queues the key, and the resend after the ack
			// is a harmless duplicate.
			m.Kind, m.Op, m.Resource, m.Version, m.Payload = message.KindEvent, message.OpUpsert, o.Resource, o.Version, o.Data
			kind = "object"
		case SendDelete:
			m.Kind, m.Op = message.KindEvent, message.OpDelete
			m.Resource = message.Resource{Group: a.Key.Group, Kind: a.Key.Kind, Namespace: a.Key.Namespace, Name: a.Key.Name}
			kind = "delete"
		case SendWant, SendPrune, SendDone:
			var p objsync.Sync
			switch a.Kind {
			case SendWant:
				p, kind = objsync.Sync{Phase: objsync.PhaseWant, Buckets: a.Buckets}, "want"
			case SendPrune:
				p, kind = objsync.Sync{Phase: objsync.PhasePrune, Hashes: a.Hashes}, "prune"
				c.d.metrics.pruned.Add(float64(len(a.Hashes)))
			default:
				p, kind = objsync.Sync{Phase: objsync.PhaseDone}, "done"
			}
			payload, err := c.d.codec.Append(nil, &p)
			if err != nil {
				return err
			}
			m.Kind, m.Payload = message.KindSync, payload
		}
		if err := c.s.Send(ctx, m); err != nil {
			return fmt.Errorf("send %s to %s: %w", kind, c.node, err)
		}
		c.d.metrics.sent.WithLabelValues(kind).Inc()
	}
	return nil
}
