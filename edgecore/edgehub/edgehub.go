// Package edgehub is EdgeCore's side of the tunnel: it keeps a session to
// the cloud, failing over between cloud addresses and reconnecting with
// backoff, runs the sync protocol on each session, and remembers across
// restarts which transport reached the cloud and its TLS session tickets. It never talks to
// Kubernetes directly.
package edgehub

import (
	"context"
	"log/slog"
	"sync"

	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tunnel"
)

// Protocol serves one session to the cloud (the syncer).
type Protocol interface {
	Serve(ctx context.Context, s *tunnel.Session) error
}

// TransportMemory keeps the transport that last reached the cloud across
// restarts (the store's meta table).
type TransportMemory interface {
	LastTransport(ctx context.Context) (store.Transport, error)
	SetLastTransport(ctx context.Context, t store.Transport) error
}

// EdgeHub keeps the edge connected to the cloud.
type EdgeHub struct {
	client   *tunnel.Client
	protocol Protocol
	memory   TransportMemory
	logger   *slog.Logger

	mu         sync.Mutex
	current    *tunnel.Session
	remembered store.Transport // what memory holds, as far as this hub knows
}

// New wraps a tunnel client. A nil memory remembers nothing across
// restarts; a memory that also keeps TLS session tickets
// (tunnel.TicketStore, as the store does) keeps the client's, so that the
// first connection after a restart resumes its TLS session. A nil logger
// discards logs.
func New(client *tunnel.Client, p Protocol, memory TransportMemory, logger *slog.Logger) *EdgeHub {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if ts, ok := memory.(tunnel.TicketStore); ok {
		client.KeepTickets(ts)
	}
	return &EdgeHub{client: client, protocol: p, memory: memory, logger: logger.With("component", "edgehub")}
}

// Run stays connected until ctx ends, serving each session in turn. It
// starts with the transport that reached the cloud last, also before a
// restart.
func (e *EdgeHub) Run(ctx context.Context) error {
	e.restoreTransport(ctx)
	return e.client.Run(ctx, e.serve)
}

// restoreTransport makes the client try the remembered transport first.
// A store that cannot be read only costs the head start.
func (e *EdgeHub) restoreTransport(ctx context.Context) {
	if e.memory == nil {
		return
	}
	t, err := e.memory.LastTransport(ctx)
	if err != nil {
		e.logger.Warn("cannot read the last transport", "err", err)
		return
	}
	e.mu.Lock()
	e.remembered = t
	e.mu.Unlock()
	if tt := fromStored(t); tt != "" {
		e.client.Prefer(tt)
		e.logger.Info("starting with the transport that worked last", "transport", string(tt))
	}
}

// rememberTransport records the session's transport when it changed.
func (e *EdgeHub) rememberTransport(ctx context.Context, s *tunnel.Session) {
	t := toStored(s.Transport())
	e.mu.Lock()
	same := e.remembered == t
	e.mu.Unlock()
	if e.memory == nil || same || t == store.TransportUnknown {
		return
	}
	if err := e.memory.SetLastTransport(ctx, t); err != nil {
		e.logger.Warn("cannot record the last transport", "transport", string(s.Transport()), "err", err)
		return
	}
	e.mu.Lock()
	e.remembered = t
	e.mu.Unlock()
}

func toStored(t tunnel.Transport) store.Transport {
	switch t {
	case tunnel.TransportQUIC:
		return store.TransportQUIC
	case tunnel.TransportWebSocket:
		return store.TransportWebSocket
	}
	return store.TransportUnknown
}

func fromStored(s store.Transport) tunnel.Transport {
	for _, t := range []tunnel.Transport{tunnel.TransportQUIC, tunnel.TransportWebSocket} {
		if toStored(t) == s {
			return t
		}
	}
	return ""
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
	e.rememberTransport(ctx, s)
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
