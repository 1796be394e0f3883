// Package hub is CloudCore's side of the tunnel: it keeps one live session
// per edge node and hands each node's messages to the cloud's logic. It
// holds no Kubernetes state of its own.
package hub

import (
	"context"
	"log/slog"
	"sync"

	"github.com/tetheredge/tether/tunnel"
)

// Protocol serves one node's session (the sync dispatcher).
type Protocol interface {
	Serve(ctx context.Context, s *tunnel.Session) error
}

// Hub tracks the connected edge nodes and runs the protocol on each
// session. It is a tunnel.Handler.
type Hub struct {
	logger    *slog.Logger
	protocol  Protocol
	onConnect func(node string)

	mu       sync.Mutex
	sessions map[string]*tunnel.Session
}

// New returns an empty hub that serves sessions with p. onConnect, when
// not nil, is told of every new session (it must not block).
func New(p Protocol, onConnect func(node string), logger *slog.Logger) *Hub {
	return &Hub{logger: logger.With("component", "hub"), protocol: p, onConnect: onConnect, sessions: make(map[string]*tunnel.Session)}
}

// Handle serves one node's session until it ends. A node that connects
// again replaces its older session, which is closed: one node, one session.
func (h *Hub) Handle(ctx context.Context, s *tunnel.Session) {
	node := s.Peer().Node
	h.mu.Lock()
	old := h.sessions[node]
	h.sessions[node] = s
	h.mu.Unlock()
	if old != nil {
		_ = old.Close("replaced by a newer session of the same node")
	}
	defer func() {
		h.mu.Lock()
		if h.sessions[node] == s {
			delete(h.sessions, node)
		}
		h.mu.Unlock()
	}()
	log := h.logger.With("node", node, "session", s.ID())
	log.Info("edge connected", "transport", string(s.Transport()))
	if h.onConnect != nil {
		h.onConnect(node)
	}
	err := h.protocol.Serve(ctx, s)
	log.Info("edge disconnected", "reason", s.Err(), "err", err)
}

// Disconnect closes node's live session, if any, telling it why. It is the
// whitelist's revocation callback: never blocks on the session.
func (h *Hub) Disconnect(node, reason string) {
	h.mu.Lock()
	s := h.sessions[node]
	h.mu.Unlock()
	if s != nil {
		h.logger.Info("closing session of a revoked node", "node", node, "reason", reason)
		s.Abort(reason)
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
