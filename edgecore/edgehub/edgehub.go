// Package edgehub is EdgeCore's side of the tunnel: it keeps a session to
// the cloud, failing over between cloud addresses and reconnecting with
// backoff, and runs the sync protocol on each session. It never talks to
// Kubernetes directly.
package edgehub

import (
	"context"
	"log/slog"

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
	return e.client.Run(ctx, e.protocol.Serve)
}
