package edgenode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/tunnel"
)

// ConnectionWriterConfig configures a ConnectionWriter. Zero values mean
// the defaults beside each field.
type ConnectionWriterConfig struct {
	// Replica names this CloudCore in status.connection. Required.
	Replica string
	// Get reads an EdgeNode from the whitelist's cache. Required.
	Get func(node string) (*EdgeNode, bool)
	// QPS and Burst bound the status writes of all nodes together.
	// Defaults 50 and 100: 10,000 edges reconnecting at once are all
	// recorded within about 3.5 minutes (the connection, then the count
	// once the sync is idle, coalesced into one write when both come
	// before the node's turn), and never more than 50 writes a second
	// reach the API server.
	QPS   float64
	Burst int
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives tether_edgenode_status_writes_total; may be nil.
	Registerer prometheus.Registerer
}

// ConnectionWriter records in each EdgeNode's status where its live
// session is (status.connection: replica, transport, the edge's remote
// address, session, since), when it last connected (status.lastConnected,
// in the same write as the connection: one write per connect) and
// how many objects it holds (status.objectsHeld). It is told of session
// starts and ends and of the count (it is a dispatch.Sessions, which
// reports the count at most every 10 s per node) and never writes per
// keepalive. Writes are
// coalesced and bounded: a node is queued at most once whatever happened
// to it meanwhile (memory is one entry per node), each write is of its
// latest state, only what differs from the cache is written, and all
// nodes' writes share one token bucket. A write is conditional on the
// cached resourceVersion; a failed one (a conflict: the cache had not
// caught up) is queued again, behind the others, after retryDelay. The end of a session clears the connection
// only if the status still names that session, so that a newer session
// (here or on another replica) is never cleared.
type ConnectionWriter struct {
	client *Client
	cfg    ConnectionWriterConfig
	logger *slog.Logger
	logLim *ratelog.Limiter
	limit  *rate.Limiter
	writes *prometheus.CounterVec
	wake   chan struct{}

	// mu guards state and the queue: the nodes whose status may differ
	// from state, in the order they changed, each at most once (queued).
	mu     sync.Mutex
	state  map[string]session
	order  []string
	queued map[string]bool
}

// retryDelay is the pause after a failed write before the next one: a
// conflict is usually the cache not having caught up with a write.
const retryDelay = 200 * time.Millisecond

// session is what the writer knows of a node's latest session.
type session struct {
	id, transport, remote string
	since                 time.Time
	objects               int64
	hasObjects            bool
	ended                 bool
}

// NewConnectionWriter returns a writer; Run writes.
func NewConnectionWriter(client *Client, cfg ConnectionWriterConfig) (*ConnectionWriter, error) {
	if client == nil || cfg.Get == nil || cfg.Replica == "" {
		return nil, errors.New("edgenode: connection writer needs a client, Get and Replica")
	}
	if cfg.QPS <= 0 {
		cfg.QPS = 50
	}
	if cfg.Burst <= 0 {
		cfg.Burst = 100
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	w := &ConnectionWriter{
		client: client, cfg: cfg, logger: logger.With("component", "edgenode_status"), logLim: ratelog.New(0, nil),
		limit: rate.NewLimiter(rate.Limit(cfg.QPS), cfg.Burst), wake: make(chan struct{}, 1), queued: map[string]bool{},
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_edgenode_status_writes_total",
			Help: "Writes of EdgeNodes' status.connection, status.lastConnected and status.objectsHeld, by result: ok, conflict (retried), error (retried), gone (no EdgeNode).",
		}, []string{"result"}),
		state: map[string]session{},
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(w.writes); err != nil {
			return nil, fmt.Errorf("register edgenode status metrics: %w", err)
		}
	}
	return w, nil
}

// Started notes a new session of node from remote (nil if unknown); it
// replaces any older one.
func (w *ConnectionWriter) Started(node, id string, transport tunnel.Transport, remote net.Addr, at time.Time) {
	addr := ""
	if remote != nil {
		addr = remote.String()
	}
	w.update(node, func(s *session, _ bool) bool {
		// In seconds, as the API server keeps it, so that the cache
		// compares equal once written. The count written before stays
		// until this session's reconcile says otherwise.
		*s = session{id: id, transport: string(transport), remote: addr, since: at.Truncate(time.Second)}
		return true
	})
}

// Held notes how many objects node holds, as its session id reports.
func (w *ConnectionWriter) Held(node, id string, objects int) {
	w.update(node, func(s *session, ok bool) bool {
		if !ok || s.id != id || s.ended {
			return false
		}
		s.objects, s.hasObjects = int64(objects), true
		return true
	})
}

// Ended notes that session id of node ended.
func (w *ConnectionWriter) Ended(node, id string) {
	w.update(node, func(s *session, ok bool) bool {
		if !ok || s.id != id {
			return false
		}
		s.ended = true
		return true
	})
}

func (w *ConnectionWriter) update(node string, fn func(s *session, ok bool) bool) {
	w.mu.Lock()
	s, ok := w.state[node]
	changed := fn(&s, ok)
	if changed {
		w.state[node] = s
		w.enqueue(node)
	}
	w.mu.Unlock()
}

// enqueue queues node once; w.mu is held.
func (w *ConnectionWriter) enqueue(node string) {
	if w.queued[node] {
		return
	}
	w.queued[node] = true
	w.order = append(w.order, node)
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// next takes the first queued node.
func (w *ConnectionWriter) next() (string, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.order) == 0 {
		return "", false
	}
	node := w.order[0]
	w.order[0] = ""
	w.order = w.order[1:]
	delete(w.queued, node)
	return node, true
}

// Run writes until ctx ends.
func (w *ConnectionWriter) Run(ctx context.Context) error {
	for {
		node, ok := w.next()
		if !ok {
			select {
			case <-ctx.Done():
				return nil
			case <-w.wake:
			}
			continue
		}
		if err := w.write(ctx, node); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			w.mu.Lock()
			w.enqueue(node)
			w.mu.Unlock()
			t := time.NewTimer(retryDelay)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
		}
	}
}

// write brings node's status to the writer's latest state of it.
func (w *ConnectionWriter) write(ctx context.Context, node string) error {
	w.mu.Lock()
	s, ok := w.state[node]
	w.mu.Unlock()
	if !ok {
		return nil
	}
	e, found := w.cfg.Get(node)
	if !found {
		w.writes.WithLabelValues("gone").Inc()
		w.forget(node, s)
		return nil
	}
	want := e.Status
	if last := e.Status.LastConnected; last == nil || last.Time.Before(s.since) {
		t := metav1.NewTime(s.since)
		want.LastConnected = &t
	}
	switch cur := e.Status.Connection; {
	case s.ended && (cur == nil || cur.Session != s.id):
		// Another session is recorded (or none): not this one's to clear;
		// only that it connected (a session that ended before its turn).
	case s.ended:
		want.Connection = nil
	default:
		if cur != nil && cur.Session != s.id && cur.Since.After(s.since) {
			// A newer session elsewhere is recorded.
			return nil
		}
		want.Connection = &Connection{Replica: w.cfg.Replica, Transport: s.transport, RemoteAddr: s.remote, Session: s.id, Since: metav1.NewTime(s.since)}
		if s.hasObjects {
			n := s.objects
			want.ObjectsHeld = &n
		}
	}
	if sameStatus(e.Status, want) {
		if s.ended {
			w.forget(node, s)
		}
		return nil
	}
	if err := w.limit.Wait(ctx); err != nil {
		return err
	}
	e.Status = want
	if _, err := w.client.UpdateStatus(ctx, e); err != nil {
		switch {
		case apierrors.IsNotFound(err):
			w.writes.WithLabelValues("gone").Inc()
			w.forget(node, s)
			return nil
		case apierrors.IsConflict(err):
			w.writes.WithLabelValues("conflict").Inc()
		default:
			w.writes.WithLabelValues("error").Inc()
			if ok, suppressed := w.logLim.Allow("write"); ok {
				w.logger.Warn("cannot write edge node status", "node", node, "err", err, "suppressed", suppressed)
			}
		}
		return fmt.Errorf("write status of edge node %s: %w", node, err)
	}
	w.writes.WithLabelValues("ok").Inc()
	if s.ended {
		w.forget(node, s)
	}
	return nil
}

// forget drops node's state if it is still s (no newer event came).
func (w *ConnectionWriter) forget(node string, s session) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.state[node] == s {
		delete(w.state, node)
	}
}

func sameStatus(a, b Status) bool {
	sameConn := (a.Connection == nil) == (b.Connection == nil) &&
		(a.Connection == nil || (a.Connection.Replica == b.Connection.Replica && a.Connection.Transport == b.Connection.Transport &&
			a.Connection.RemoteAddr == b.Connection.RemoteAddr && a.Connection.Session == b.Connection.Session && a.Connection.Since.Equal(&b.Connection.Since)))
	sameObjects := (a.ObjectsHeld == nil) == (b.ObjectsHeld == nil) && (a.ObjectsHeld == nil || *a.ObjectsHeld == *b.ObjectsHeld)
	return sameConn && sameObjects && a.LastConnected.Equal(b.LastConnected) // metav1.Time.Equal: nil-safe
}
