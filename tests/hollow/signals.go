package hollow

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
)

// The constant log messages a hollow edge's state is read from: the
// tunnel client's (tunnel/client.go) when a session opens and when it
// ends, and the syncer's (edgecore/syncer/loop.go) when the cloud's Done
// ends a reconcile. If one is renamed, the smoke test's edges never
// connect and it fails.
const (
	msgConnected    = "connected to cloud"
	msgDisconnected = "disconnected from cloud"
	msgReconciled   = "reconcile: cloud has queued every difference"
)

// Edge is one hollow edge.
type Edge struct {
	id    Identity
	watch objsync.Key

	mu              sync.Mutex
	st              *store.Store // nil until started
	started         time.Time
	connected       bool
	reconciled      bool // in the current session
	sessions        int
	firstConnected  time.Time
	firstReconciled time.Time
	lastReconciled  time.Time
	watched         time.Time // the last commit that wrote the watched key
}

// EdgeState is what an edge has done so far.
type EdgeState struct {
	Node string
	// Store is the edge's store; nil until it started.
	Store *store.Store
	// Connected: a session is live; Reconciled: it finished a reconcile.
	Connected, Reconciled bool
	// Sessions counts the sessions the edge has opened.
	Sessions int
	// When it started, first connected, first and last reconciled, and
	// last committed the watched key (zero: not yet).
	Started, FirstConnected, FirstReconciled, LastReconciled, Watched time.Time
}

// Node returns the edge's node name.
func (e *Edge) Node() string { return e.id.Node }

// State returns the edge's state now.
func (e *Edge) State() EdgeState {
	e.mu.Lock()
	defer e.mu.Unlock()
	return EdgeState{
		Node: e.id.Node, Store: e.st, Connected: e.connected, Reconciled: e.reconciled, Sessions: e.sessions,
		Started: e.started, FirstConnected: e.firstConnected, FirstReconciled: e.firstReconciled,
		LastReconciled: e.lastReconciled, Watched: e.watched,
	}
}

// signal records what a log message of the edge's says happened.
func (e *Edge) signal(msg string, at time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch msg {
	case msgConnected:
		e.connected, e.reconciled = true, false
		e.sessions++
		if e.firstConnected.IsZero() {
			e.firstConnected = at
		}
	case msgDisconnected:
		e.connected, e.reconciled = false, false
	case msgReconciled:
		e.reconciled, e.lastReconciled = true, at
		if e.firstReconciled.IsZero() {
			e.firstReconciled = at
		}
	}
}

// signals is an edge's log handler: it hands the state messages to the
// edge and passes warnings and errors on to next.
type signals struct {
	e     *Edge
	next  slog.Handler
	attrs []slog.Attr
}

func (h signals) Enabled(ctx context.Context, l slog.Level) bool {
	return l == slog.LevelInfo || (l >= slog.LevelWarn && h.next.Enabled(ctx, l))
}

func (h signals) Handle(ctx context.Context, r slog.Record) error {
	if r.Level == slog.LevelInfo {
		h.e.signal(r.Message, r.Time)
		return nil
	}
	if len(h.attrs) > 0 {
		r = r.Clone()
		r.AddAttrs(h.attrs...)
	}
	return h.next.Handle(ctx, r)
}

// WithAttrs keeps the attributes for the records passed on; it does not
// pass them to next at once, so that Info records cost nothing more.
func (h signals) WithAttrs(as []slog.Attr) slog.Handler {
	h.attrs = append(h.attrs[:len(h.attrs):len(h.attrs)], as...)
	return h
}

// WithGroup is ignored: the state messages carry no groups that matter,
// and warnings are rare enough to read flat.
func (h signals) WithGroup(string) slog.Handler { return h }

// observed is an edge's store as the syncer writes it, timestamping the
// commits of the watched key.
type observed struct {
	*store.Store
	e *Edge
}

func (o observed) Apply(ctx context.Context, changes []store.Change) error {
	if err := o.Store.Apply(ctx, changes); err != nil {
		return err
	}
	if o.e.watch == (objsync.Key{}) {
		return nil
	}
	for _, c := range changes {
		if c.Object.Key() == o.e.watch {
			now := time.Now()
			o.e.mu.Lock()
			o.e.watched = now
			o.e.mu.Unlock()
			break
		}
	}
	return nil
}
