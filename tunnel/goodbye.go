package tunnel

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/tetheredge/tether/common/message"
)

// Goodbye: a cloud replica over its fair share of sessions asks an edge
// to move (docs/protocol.md, "Rebalancing"). The server sends a
// message.KindGoodbye carrying a message.Goodbye; the client's session
// takes it for itself (the user of the session never sees it), records
// the hint and closes the session; Client.Run then starts its next pass at
// the hinted server when it is one of its own, else at the next one. A
// peer that does not act on it is closed by the server after a grace
// period.

// goodbyeState is a session's part in it.
type goodbyeState struct {
	// take is set on client sessions before they start: they act on
	// goodbyes. A server session delivers one like any other message
	// (and its user refuses it: edges send none).
	take bool

	mu   sync.Mutex
	hint string // set once a goodbye was taken
}

// Goodbye asks the peer to end the session and connect again, to hint
// first (an address as in ClientConfig.Servers; empty: none). It returns
// once the message is queued; the session ends when the peer closes it,
// or after grace if it has not by then.
func (s *Session) Goodbye(ctx context.Context, reason, hint string, grace time.Duration) error {
	g := message.Goodbye{Reason: reason, Hint: hint}
	if err := g.Validate(); err != nil {
		return fmt.Errorf("send goodbye: %w", err)
	}
	payload, err := s.cfg.codec.Append(nil, &g)
	if err != nil {
		return fmt.Errorf("encode goodbye: %w", err)
	}
	if err := s.Send(ctx, &message.Message{Kind: message.KindGoodbye, Time: time.Now().UnixNano(), Payload: payload}); err != nil {
		return fmt.Errorf("send goodbye: %w", err)
	}
	t := time.AfterFunc(grace, func() { s.Abort("goodbye not honoured: " + reason) })
	context.AfterFunc(s.ctx, func() { t.Stop() })
	return nil
}

// takeGoodbye acts on a goodbye received by a client session: it records
// the hint and ends the session. A payload that does not decode is a bad
// frame, like any other.
func (s *Session) takeGoodbye(m *message.Message) error {
	var g message.Goodbye
	err := s.cfg.codec.UnmarshalValue(m.Payload, &g)
	if err == nil {
		err = g.Validate()
	}
	if err != nil {
		err = fmt.Errorf("goodbye: %w", err)
		s.fail(reasonFrame, err)
		return err
	}
	s.goodbye.mu.Lock()
	s.goodbye.hint = g.Hint
	s.goodbye.mu.Unlock()
	s.log().Info("cloud asked this edge to move", "reason", g.Reason, "hint", g.Hint)
	s.Abort("goodbye: " + g.Reason)
	return nil
}

// Hint returns the address a goodbye from the cloud asked to connect to
// next, or "" when none came.
func (s *Session) Hint() string {
	s.goodbye.mu.Lock()
	defer s.goodbye.mu.Unlock()
	return s.goodbye.hint
}

// startAt makes the next pass start at the server hint names, when it is
// one of the configured ones (same address, and a transport it may be
// reached by), and reports whether it was. An edge never dials an address
// it was not given: a hint elsewhere is ignored.
func (c *Client) startAt(hint string) bool {
	addr, transport := hint, Transport("")
	switch {
	case strings.HasPrefix(hint, "quic://"):
		addr, transport = strings.TrimPrefix(hint, "quic://"), TransportQUIC
	case strings.HasPrefix(hint, "wss://"):
		addr, transport = strings.TrimPrefix(hint, "wss://"), TransportWebSocket
	}
	for i, sv := range c.servers {
		if sv.addr != addr || (transport != "" && !containsTransport(sv.transports, transport)) {
			continue
		}
		c.mu.Lock()
		c.last = i
		c.mu.Unlock()
		return true
	}
	return false
}

func containsTransport(ts []Transport, t Transport) bool {
	for _, x := range ts {
		if x == t {
			return true
		}
	}
	return false
}
