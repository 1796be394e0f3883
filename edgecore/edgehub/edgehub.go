// Package edgehub is EdgeCore's side of the tunnel: it keeps a session to
// the cloud, failing over between cloud addresses and reconnecting with
// backoff, and runs the sync protocol on each session. It never talks to
// Kubernetes directly.
package edgehub

import (
	"context"
	"log/slog"
	"sync"

	"github.com/tetheredge/tether/tunnel"
)

// Protocol serves one session to the cloud (the syncer).
type Protocol interface {
	Serve(ctx context.Context, s *tunnel.Session) error
}

// EdgeHub keeps the edge connected to the cloud.
type EdgeHub struct {
	client   *tunnel.Client
	protocol Protocol
	logger   *slog.Logger

	mu      sync.Mutex
	current *tunnel.Session
}

// New wraps a tunnel client. A nil logger discards logs.
func New(client *tunnel.Client, p Protocol, logger *slog.Logger) *EdgeHub {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &EdgeHub{client: client, protocol: p, logger: logger.With("component", "edgehub")}
}

// Run stays connected until ctx ends, serving each session in turn.
func (e *EdgeHub) Run(ctx context.Context) error {
	return e.client.Run(ctx, e.serve)
}

func (e *EdgeHub) serve(ctx context.Context, s *tunnel.Session) error {
	e.mu.Lock()
	e.current = s
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		if e.current == s {
			e.current = nil
		}
		e.mu.Unlock()
	}()
	return e.protocol.Serve(ctx, s)
}

// Reconnect ends the live session, if any, so that the next one is made
// with what the edge holds now: after a certificate renewal the cloud
// accepts the replaced certificate only until the edge shows it has the
// new one, by connecting with it. Never blocks on the session.
func (e *EdgeHub) Reconnect(reason string) {
	e.mu.Lock()
	s := e.current
	e.mu.Unlock()
	if s != nil {
		e.logger.Info("reconnecting", "reason", reason)
		_ = s.Close(reason)
	}
}
