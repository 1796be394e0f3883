package tunnel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/quic-go/quic-go"
)

// TLS 1.3 session resumption, client side. The client keeps the last
// ticket the cloud issued per transport and server name, in memory and, when
// ClientConfig.Tickets is set, in a store that outlives the process. A
// ticket is kept together with the fingerprint of the client certificate
// in use when it arrived, and offered only while that certificate is still
// the current one: after a renewal the next handshake is a full one, with
// the new certificate. A ticket is dropped when the server answers a
// handshake with a TLS alert or a refusal, so that a ticket the server
// does not accept any more cannot keep the client out, and only then: a
// dial that nothing answered (an outage) keeps it for the next one.
//
// A client that offers a ticket offers an X25519 key share only (unless its
// TLS config names curves itself): the hybrid X25519MLKEM768 share is
// 1.2 kB, which makes the ClientHello span two padded Initial datagrams,
// and the server's answer 1.1 kB larger. The resumed session's keys mix
// the ticket's secret, which came from a full handshake with the hybrid
// exchange, with the fresh X25519 one, so they are as safe against a
// future quantum computer as that first handshake. Should the server
// decline the ticket, it refuses the classical full handshake that would
// follow (server.go, reason "ticket_declined"); the client drops the
// ticket, and its next attempt is a full hybrid handshake.
//
// What a ticket holds (the resumption secret) lets whoever has it resume
// the node's session until the ticket expires, without the private key:
// it is as sensitive as the node's key, for a bounded time (ServerConfig.
// TicketRotation, at most twice).

// TicketStore keeps the client's session tickets across restarts. Values
// are opaque to it. Its methods are called from inside TLS handshakes and
// should be quick.
type TicketStore interface {
	// LoadTicket returns what SaveTicket saved under key last, or nil.
	LoadTicket(ctx context.Context, key string) ([]byte, error)
	// SaveTicket saves data under key, replacing what was there; nil data
	// removes it.
	SaveTicket(ctx context.Context, key string, data []byte) error
}

// ticketCache is a tls.ClientSessionCache for one transport.
type ticketCache struct {
	transport Transport
	cert      func() []byte
	logger    *slog.Logger

	mu    sync.Mutex
	store TicketStore             // nil: memory only
	mem   map[string]cachedTicket // by store key
}

type cachedTicket struct {
	cert  [32]byte // SHA-256 of the client certificate it was issued with
	state *tls.ClientSessionState
}

func newTicketCache(t Transport, store TicketStore, cert func() []byte, logger *slog.Logger) *ticketCache {
	return &ticketCache{transport: t, store: store, cert: cert, logger: logger, mem: make(map[string]cachedTicket)}
}

// KeepTickets makes the client keep its session tickets in store from now
// on, as ClientConfig.Tickets does (EdgeCore hands its store over once it
// is open). Call it before Dial or Run.
func (c *Client) KeepTickets(store TicketStore) {
	for _, tc := range c.tickets {
		tc.mu.Lock()
		tc.store = store
		tc.mu.Unlock()
	}
}

func (c *ticketCache) key(serverName string) string { return string(c.transport) + "/" + serverName }

// Get returns the ticket for serverName if it was issued with the
// certificate the client presents now.
func (c *ticketCache) Get(serverName string) (*tls.ClientSessionState, bool) {
	cur := c.cert()
	if cur == nil {
		return nil, false
	}
	fp := sha256.Sum256(cur)
	key := c.key(serverName)
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.mem[key]
	if !ok && c.store != nil {
		e, ok = c.load(key)
		if ok {
			c.mem[key] = e
		}
	}
	if !ok || e.cert != fp {
		return nil, false
	}
	return e.state, true
}

// Put keeps the ticket the server just issued for serverName. A nil cs,
// which crypto/tls puts after any failed handshake that offered a ticket,
// a timeout on a path that drops everything included, changes nothing:
// the tunnel drops a ticket itself when the server answered (dropAnswered,
// drop), so that an outage does not cost the first reconnect after it its
// resumption. (crypto/tls also puts nil for a ticket it will not offer
// again, expired or issued under a server certificate no longer valid; it
// checks that at every Get, and the next full handshake's ticket replaces
// it.)
//
// A ticketKeep label from the server (ticket.go) changes nothing either:
// the ticket this connection resumed with stays the one offered.
func (c *ticketCache) Put(serverName string, cs *tls.ClientSessionState) {
	key := c.key(serverName)
	if cs == nil {
		return
	}
	if ticket, _, err := cs.ResumptionState(); err == nil && bytes.Equal(ticket, ticketKeep) {
		return
	}
	cur := c.cert()
	if cur == nil {
		return
	}
	e := cachedTicket{cert: sha256.Sum256(cur), state: cs}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mem[key] = e
	if c.store == nil {
		return
	}
	data, err := encodeTicket(e)
	if err == nil {
		err = c.store.SaveTicket(context.Background(), key, data)
	}
	if err != nil {
		c.logger.Warn("cannot save session ticket", "key", key, "err", err)
	}
}

// dropAnswered forgets serverName's ticket: the server refused a handshake.
func (c *ticketCache) dropAnswered(serverName string) { c.forget(c.key(serverName)) }

// drop forgets serverName's ticket if it is still state (and not one that
// arrived since).
func (c *ticketCache) drop(serverName string, state *tls.ClientSessionState) {
	key := c.key(serverName)
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.mem[key]; ok && e.state == state {
		c.forgetLocked(key)
	}
}

func (c *ticketCache) forget(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.forgetLocked(key)
}

func (c *ticketCache) forgetLocked(key string) {
	delete(c.mem, key)
	if c.store != nil {
		if err := c.store.SaveTicket(context.Background(), key, nil); err != nil {
			c.logger.Warn("cannot remove session ticket", "key", key, "err", err)
		}
	}
}

// load reads a stored ticket; one that cannot be read is removed.
func (c *ticketCache) load(key string) (cachedTicket, bool) {
	data, err := c.store.LoadTicket(context.Background(), key)
	if err != nil {
		c.logger.Warn("cannot load session ticket", "key", key, "err", err)
		return cachedTicket{}, false
	}
	if data == nil {
		return cachedTicket{}, false
	}
	e, err := decodeTicket(data)
	if err != nil {
		c.logger.Warn("stored session ticket unreadable, removed", "key", key, "err", err)
		if err := c.store.SaveTicket(context.Background(), key, nil); err != nil {
			c.logger.Warn("cannot remove session ticket", "key", key, "err", err)
		}
		return cachedTicket{}, false
	}
	return e, true
}

// storedTicketVersion is the first byte of a stored ticket:
//
//	version  uint8 = 1
//	cert     [32]byte     SHA-256 of the client certificate
//	ticket   uvarint length, bytes   (opaque, sealed by the server)
//	state    the rest: tls.SessionState.Bytes (the resumption secret)
const storedTicketVersion = 1

func encodeTicket(e cachedTicket) ([]byte, error) {
	ticket, state, err := e.state.ResumptionState()
	if err != nil {
		return nil, fmt.Errorf("encode session ticket: %w", err)
	}
	if state == nil {
		return nil, errors.New("encode session ticket: no session state")
	}
	sb, err := state.Bytes()
	if err != nil {
		return nil, fmt.Errorf("encode session ticket: %w", err)
	}
	out := append([]byte{storedTicketVersion}, e.cert[:]...)
	out = binary.AppendUvarint(out, uint64(len(ticket)))
	out = append(out, ticket...)
	return append(out, sb...), nil
}

func decodeTicket(data []byte) (cachedTicket, error) {
	var e cachedTicket
	if len(data) < 1+32 || data[0] != storedTicketVersion {
		return e, errors.New("decode session ticket: unknown format")
	}
	copy(e.cert[:], data[1:33])
	rest := data[33:]
	n, l := binary.Uvarint(rest)
	if l <= 0 || n > uint64(len(rest)-l) {
		return e, errors.New("decode session ticket: bad ticket length")
	}
	ticket := rest[l : l+int(n)]
	state, err := tls.ParseSessionState(rest[l+int(n):])
	if err != nil {
		return e, fmt.Errorf("decode session ticket: %w", err)
	}
	cs, err := tls.NewResumptionState(ticket, state)
	if err != nil {
		return e, fmt.Errorf("decode session ticket: %w", err)
	}
	e.state = cs
	return e, nil
}

// serverAnswered says whether err is the server's answer to a handshake (a
// TLS alert, a QUIC crypto error, a refusal), rather than a network failure:
// then the ticket offered, if any, is dropped.
func serverAnswered(err error) bool {
	var refused *RefusedError
	if errors.As(err, &refused) {
		return true
	}
	var te *quic.TransportError
	if errors.As(err, &te) && te.Remote && te.ErrorCode.IsCryptoError() {
		return true
	}
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "remote error"
}
