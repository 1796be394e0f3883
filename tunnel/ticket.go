package tunnel

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// TLS 1.3 session resumption (RFC 8446, 2.2), server side.
//
// After each handshake the server sends one ticket: the TLS session state
// (the resumption secret and the client's certificate chain, which crypto/tls
// keeps in it) plus a binding of the node's identity, sealed with a key
// that every replica derives from the same secret. A client that presents
// the ticket on its next connection skips the certificate flights of both
// sides (about 2.5 kB down and 1 kB up on QUIC) and the signatures.
//
// A ticket is never a way around the whitelist:
//
//   - On presentation the binding (node, serial, expiry) is checked by
//     ServerConfig.Authorize exactly as the certificate of a full handshake
//     is; a node that is disabled, rejoined (new serial) or revoked since
//     the ticket was issued is not resumed, and the handshake continues as
//     a full one, in which the certificate the client sends now is checked.
//   - On a resumed connection VerifyConnection runs again with the chain
//     from the ticket: the chain is verified against the current client CA
//     pool at the current time and Authorize is asked again, as for a full
//     handshake. crypto/tls itself declines a ticket whose client
//     certificate has expired (ServerConfig.Now).
//   - The session that results has the certificate's Identity, so it ends
//     at the certificate's expiry like any other (cloudcore/hub).
//   - No 0-RTT data is accepted (replays).
//
// Keys rotate: time is cut into epochs of TicketRotation, the key of epoch
// e is HKDF-SHA256(secret, "tether session ticket key" + e), tickets are
// sealed with the current epoch's key and opened with the current or the
// previous one. So a ticket lives between one and two rotation periods, and
// replicas that share the secret (and a clock to within a period) accept
// each other's tickets without talking to each other.
//
// Ticket layout (all integers big-endian):
//
//	version  uint8  = 1
//	epoch    uint64
//	nonce    [12]byte
//	sealed   AES-256-GCM(key(epoch), nonce, session state, aad = version|epoch)

// ticketVersion is the first byte of every ticket this server seals.
const ticketVersion = 1

// ticketBindingPrefix marks the server's binding among the session state's
// Extra entries (quic-go adds its own, with its own prefix).
const ticketBindingPrefix = "tether-node/1\x00"

// errTicketUnknown: the ticket is not one this cluster sealed in the last two
// epochs (another key, an old epoch, damaged). The client gets a full
// handshake.
var errTicketUnknown = errors.New("session ticket not sealed by a current key")

// ticketSealer seals and opens session tickets with epoch keys derived from
// one secret.
type ticketSealer struct {
	secret [32]byte
	period time.Duration
	now    func() time.Time
}

func (k *ticketSealer) epoch(t time.Time) uint64 {
	return uint64(t.UnixNano() / int64(k.period))
}

func (k *ticketSealer) aead(epoch uint64) (cipher.AEAD, error) {
	key, err := hkdf.Key(sha256.New, k.secret[:], nil, "tether session ticket key "+strconv.FormatUint(epoch, 10), 32)
	if err != nil {
		return nil, fmt.Errorf("derive ticket key: %w", err)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("derive ticket key: %w", err)
	}
	return cipher.NewGCM(block)
}

// seal returns the ticket of a session state, under the current epoch's key.
func (k *ticketSealer) seal(state []byte) ([]byte, error) {
	epoch := k.epoch(k.now())
	aead, err := k.aead(epoch)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 1+8+aead.NonceSize(), 1+8+aead.NonceSize()+len(state)+aead.Overhead())
	out[0] = ticketVersion
	binary.BigEndian.PutUint64(out[1:9], epoch)
	_, _ = rand.Read(out[9:]) // crypto/rand.Read never fails on Linux
	return aead.Seal(out, out[9:], state, out[:9]), nil
}

// open returns the session state sealed in ticket, and whether it was
// sealed in the current epoch, or errTicketUnknown.
func (k *ticketSealer) open(ticket []byte) (state []byte, current bool, err error) {
	if len(ticket) < 1+8+12 || ticket[0] != ticketVersion {
		return nil, false, errTicketUnknown
	}
	epoch := binary.BigEndian.Uint64(ticket[1:9])
	cur := k.epoch(k.now())
	if epoch != cur && epoch+1 != cur {
		return nil, false, errTicketUnknown
	}
	aead, err := k.aead(epoch)
	if err != nil {
		return nil, false, err
	}
	state, err = aead.Open(nil, ticket[9:21], ticket[21:], ticket[:9])
	if err != nil {
		return nil, false, errTicketUnknown
	}
	return state, epoch == cur, nil
}

// extensionPreSharedKey is the TLS extension that carries a ticket
// (RFC 8446, 4.2.11).
const extensionPreSharedKey = 41

// postQuantum says whether a TLS key exchange is a post-quantum hybrid.
func postQuantum(c tls.CurveID) bool {
	switch c {
	case tls.X25519MLKEM768, tls.SecP256r1MLKEM768, tls.SecP384r1MLKEM1024:
		return true
	}
	return false
}

// ticketBinding is the identity a ticket was issued to, as Authorize sees it.
func ticketBinding(id Identity) []byte {
	return fmt.Appendf(nil, "%s%s\x00%s\x00%d", ticketBindingPrefix, id.Node, id.Serial, id.NotAfter.Unix())
}

// bindingOf finds the binding among a session state's Extra entries.
func bindingOf(extra [][]byte) (Identity, bool) {
	for _, e := range extra {
		rest, ok := strings.CutPrefix(string(e), ticketBindingPrefix)
		if !ok {
			continue
		}
		parts := strings.Split(rest, "\x00")
		if len(parts) != 3 || parts[0] == "" || parts[1] == "" {
			return Identity{}, false
		}
		exp, err := strconv.ParseInt(parts[2], 10, 64)
		if err != nil {
			return Identity{}, false
		}
		return Identity{Node: parts[0], Serial: parts[1], NotAfter: time.Unix(exp, 0)}, true
	}
	return Identity{}, false
}

// Outcomes of a presented ticket, for tether_tunnel_resumptions_total.
const (
	ticketResumed       = "resumed"        // the session was resumed
	ticketUnknown       = "unknown"        // not sealed by a current key, or not a ticket of this server
	ticketNotAuthorized = "not_authorized" // the bound identity is no longer accepted
)

// wrapSession is the server's tls.Config.WrapSession: it binds the state to
// the verified client and seals it.
func (s *Server) wrapSession(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
	if len(cs.PeerCertificates) == 0 { // cannot happen: VerifyConnection requires one
		return nil, errors.New("seal session ticket: no client certificate")
	}
	ss.Extra = append(ss.Extra, ticketBinding(identityOf(cs.PeerCertificates[0])))
	ss.EarlyData = false
	state, err := ss.Bytes()
	if err != nil {
		return nil, fmt.Errorf("seal session ticket: %w", err)
	}
	return s.tickets.seal(state)
}

// Keeping a ticket. crypto/tls sends one NewSessionTicket after every
// handshake, resumed ones too (quic-go asks for it at handshake
// completion, crypto/tls sends it with its last flight on TCP), and
// neither lets a server skip it for one connection: a WrapSession error
// fails the connection, and SessionTicketsDisabled, read from quic-go's
// own copy of the connection's tls.Config, would also refuse the ticket
// presented. What can change is what the message carries. A client that
// offers the ALPN protocol alpnKeepTicket (besides the transport's own,
// which is the one negotiated) understands the label ticketKeep: "keep the
// ticket you resumed with". A connection that resumed a ticket sealed in
// the current epoch gets that label, 13 bytes, instead of a new sealed
// state of about 650 (the client certificate is most of it), and the
// client keeps offering its ticket; one that resumed a ticket of the
// previous epoch, or made a full handshake, gets a new ticket, so a client
// still receives one per rotation period. A client that does not offer
// alpnKeepTicket (an older EdgeCore) always gets a new ticket.

// alpnKeepTicket is the ALPN protocol a client offers to say it
// understands ticketKeep. It is never negotiated.
const alpnKeepTicket = "tk"

// ticketKeep is the label of the NewSessionTicket that tells the client to
// keep its ticket. It is not a ticket this server seals (those start with
// ticketVersion and are longer), so an older client that stored it would
// have it declined as unknown.
var ticketKeep = []byte("tether-keep/1")

// sessionHooks returns the server's tls.Config.UnwrapSession and
// WrapSession for one connection on transport t; keepable says whether the
// client offered alpnKeepTicket.
func (s *Server) sessionHooks(t Transport, remote string, keepable bool) (
	unwrap func([]byte, tls.ConnectionState) (*tls.SessionState, error),
	wrap func(tls.ConnectionState, *tls.SessionState) ([]byte, error),
) {
	var fresh atomic.Bool // resumed a ticket of the current epoch
	unwrapOne := s.unwrapSession(t, remote, &fresh)
	return unwrapOne, func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		if keepable && cs.DidResume && fresh.Load() {
			return ticketKeep, nil
		}
		return s.wrapSession(cs, ss)
	}
}

// unwrapSession returns the server's tls.Config.UnwrapSession for transport
// t. It never fails the handshake: a ticket it does not accept makes a full
// handshake (a nil state), counted and logged rate-limited. It sets fresh
// when it accepts a ticket sealed in the current epoch.
func (s *Server) unwrapSession(t Transport, remote string, fresh *atomic.Bool) func([]byte, tls.ConnectionState) (*tls.SessionState, error) {
	return func(ticket []byte, _ tls.ConnectionState) (*tls.SessionState, error) {
		decline := func(outcome string, err error) (*tls.SessionState, error) {
			s.metrics.Resumptions.WithLabelValues(string(t), outcome).Inc()
			if ok, suppressed := s.logs.Allow(string(t) + "/ticket/" + outcome); ok {
				s.logger.Info("session ticket declined", "transport", string(t), "remote", remote, "outcome", outcome, "err", err, "suppressed", suppressed)
			}
			return nil, nil
		}
		state, current, err := s.tickets.open(ticket)
		if err != nil {
			return decline(ticketUnknown, err)
		}
		ss, err := tls.ParseSessionState(state)
		if err != nil {
			return decline(ticketUnknown, fmt.Errorf("parse session state: %w", err))
		}
		id, ok := bindingOf(ss.Extra)
		if !ok {
			return decline(ticketUnknown, errors.New("session state carries no node binding"))
		}
		if s.cfg.Authorize != nil {
			if err := s.cfg.Authorize(id); err != nil {
				return decline(ticketNotAuthorized, fmt.Errorf("node %q serial %s: %w", id.Node, id.Serial, err))
			}
		}
		fresh.Store(current)
		return ss, nil
	}
}
