// Package edgehub is EdgeCore's side of the tunnel: it keeps a session to
// the cloud, failing over between cloud addresses and reconnecting with
// backoff, and hands the cloud's messages to the edge's logic. It never
// talks to Kubernetes directly.
package edgehub

import (
	"context"
	"log/slog"

	"github.com/tetheredge/tether/tunnel"
)

// EdgeHub keeps the edge connected to the cloud.
type EdgeHub struct {
	client *tunnel.Client
	logger *slog.Logger
}

// New wraps a tunnel client.
func New(client *tunnel.Client, logger *slog.Logger) *EdgeHub {
	return &EdgeHub{client: client, logger: logger.With("component", "edgehub")}
}

// Run stays connected until ctx ends.
func (e *EdgeHub) Run(ctx context.Context) error {
	return e.client.Run(ctx, func(ctx context.Context, s *tunnel.Session) error {
		for {
			m, err := s.Recv(ctx)
			if err != nil {
				return err
			}
			e.logger.Debug("message from cloud", "kind", m.Kind.String(), "resource", m.Resource.String())
		}
	})
}
