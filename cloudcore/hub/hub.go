// Package hub is CloudCore's side of the tunnel: it keeps one live session
// per edge node, hands each node's messages to the cloud's logic, and ends
// a session as soon as its certificate stops being accepted (revoked,
// superseded, past its grace or expired). It holds no Kubernetes state of
// its own: the Gate (the whitelist) decides. Its Balancer (balancer.go)
// spreads sessions over CloudCore replicas: it writes this replica's
// Lease only, reads the others', and moves sessions only by goodbyes.
package hub

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/tetheredge/tether/tunnel"
)

// errExpired ends a session whose certificate expired, when there is no
// gate to say so.
var errExpired = errors.New("hub: the node certificate expired")

// Protocol serves one node's session (the sync dispatcher).
type Protocol interface {
	Serve(ctx context.Context, s *tunnel.Session) error
}

// Gate decides whether a peer may keep its session: the whitelist.
type Gate interface {
	// Until returns until when id may keep a session, or why it may not
	// now. It must not block (a cache read).
	Until(id tunnel.Identity) (time.Time, error)
	// Connected is told of every session that registered and passed
	// Until. It must not block.
	Connected(id tunnel.Identity)
}

// Hub tracks the connected edge nodes and runs the protocol on each
// session. It is a tunnel.Handler.
//
// The handshake's authorisation is not enough: a session registers only
// after its hello, and its certificate can be revoked in between. So a
// session is checked again once it is registered (a change after that
// reaches it through Recheck), whenever its node's whitelist entry
// changes, and when its acceptance ends (a timer per session at the time
// Until returned).
type Hub struct {
	logger   *slog.Logger
	protocol Protocol
	gate     Gate
	now      func() time.Time

	mu       sync.Mutex
	sessions map[string]*entry
}

// entry is one registered session and its expiry timer.
type entry struct {
	s     *tunnel.Session
	since time.Time // when it registered

	mu    sync.Mutex
	timer *time.Timer
	ended bool
}

// New returns an empty hub that serves sessions with p. gate, when not
// nil, is asked whether each session may continue; without one, a session
// ends only when its certificate expires. A nil logger discards logs.
func New(p Protocol, gate Gate, logger *slog.Logger) *Hub {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Hub{logger: logger.With("component", "hub"), protocol: p, gate: gate, now: time.Now, sessions: make(map[string]*entry)}
}

// Handle serves one node's session until it ends. A node that connects
// again replaces its older session, which is closed: one node, one
// session. A session whose certificate is no longer accepted is closed at
// once.
func (h *Hub) Handle(ctx context.Context, s *tunnel.Session) {
	peer := s.Peer()
	node := peer.Node
	e := &entry{s: s, since: h.now()}
	h.mu.Lock()
	old := h.sessions[node]
	h.sessions[node] = e
	h.mu.Unlock()
	if old != nil {
		_ = old.s.Close("replaced by a newer session of the same node")
	}
	defer func() {
		h.mu.Lock()
		if h.sessions[node] == e {
			delete(h.sessions, node)
		}
		h.mu.Unlock()
		e.end()
	}()
	log := h.logger.With("node", node, "session", s.ID())
	// Checked after registering, so that a whitelist change is seen either
	// here or by Recheck, never by neither.
	if !h.check(e) {
		return
	}
	log.Info("edge connected", "transport", string(s.Transport()), "serial", peer.Serial)
	if h.gate != nil {
		h.gate.Connected(peer)
	}
	err := h.protocol.Serve(ctx, s)
	log.Info("edge disconnected", "reason", s.Err(), "err", err)
}

// check asks whether e's session may continue; if not, it aborts the
// session, otherwise it arms the session's timer to check again when the
// acceptance ends. It never blocks on the session.
func (h *Hub) check(e *entry) bool {
	peer := e.s.Peer()
	until, err := peer.NotAfter, error(nil)
	if h.gate != nil {
		until, err = h.gate.Until(peer)
	} else if h.now().After(until) {
		err = errExpired
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ended {
		return false
	}
	if err != nil {
		h.logger.Info("closing session of a node no longer accepted", "node", peer.Node, "session", e.s.ID(),
			"serial", peer.Serial, "reason", err)
		e.s.Abort(err.Error())
		return false
	}
	if e.timer != nil {
		e.timer.Stop()
	}
	// A little past the end, so that the check then sees it ended.
	e.timer = time.AfterFunc(until.Sub(h.now())+time.Millisecond, func() { h.check(e) })
	return true
}

// end stops e's timer for good.
func (e *entry) end() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ended = true
	if e.timer != nil {
		e.timer.Stop()
	}
}

// Recheck checks node's live session, if any, against the gate again and
// closes it when it is no longer accepted. It is the whitelist's change
// callback: it never blocks on the session.
func (h *Hub) Recheck(node string) {
	h.mu.Lock()
	e := h.sessions[node]
	h.mu.Unlock()
	if e != nil {
		h.check(e)
	}
}

// Connected returns the names of the nodes with a live session.
func (h *Hub) Connected() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	names := make([]string, 0, len(h.sessions))
	for n := range h.sessions {
		names = append(names, n)
	}
	return names
}

// Count returns how many sessions are live.
func (h *Hub) Count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.sessions)
}

// oldest returns up to n live sessions registered before cutoff, the
// longest-lived first: a session that just arrived (perhaps moved here)
// is never the one moved on.
func (h *Hub) oldest(n int, cutoff time.Time) []*tunnel.Session {
	h.mu.Lock()
	es := make([]*entry, 0, len(h.sessions))
	for _, e := range h.sessions {
		if e.since.Before(cutoff) {
			es = append(es, e)
		}
	}
	h.mu.Unlock()
	slices.SortFunc(es, func(a, b *entry) int { return a.since.Compare(b.since) })
	out := make([]*tunnel.Session, 0, min(n, len(es)))
	for _, e := range es[:min(n, len(es))] {
		out = append(out, e.s)
	}
	return out
}
