package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// memTickets is a TicketStore in memory: what a restarted client finds in
// its store (tests share one between two clients).
type memTickets struct {
	mu   sync.Mutex
	data map[string][]byte
}

func (m *memTickets) LoadTicket(_ context.Context, key string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.data[key], nil
}

func (m *memTickets) SaveTicket(_ context.Context, key string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.data == nil {
		m.data = make(map[string][]byte)
	}
	if data == nil {
		delete(m.data, key)
	} else {
		m.data[key] = data
	}
	return nil
}

// snapshot returns the stored data, concatenated.
func (m *memTickets) snapshot() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var b strings.Builder
	for _, v := range m.data {
		b.Write(v)
	}
	return b.String()
}

func (m *memTickets) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.data)
}

// peers records the identity of every session the server established.
type peers struct {
	mu  sync.Mutex
	ids []Identity
}

func (p *peers) handler() Handler {
	return HandlerFunc(func(ctx context.Context, s *Session) {
		p.mu.Lock()
		p.ids = append(p.ids, s.Peer())
		p.mu.Unlock()
		echo(ctx, s)
	})
}

func (p *peers) last(t *testing.T) Identity {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	require.NotEmpty(t, p.ids)
	return p.ids[len(p.ids)-1]
}

var testTicketSecret = [32]byte{1, 2, 3}

// resumeClient is a client of one server address with tc and store.
func resumeClient(t *testing.T, server string, tc *tls.Config, store TicketStore) *Client {
	t.Helper()
	c, err := NewClient(ClientConfig{Options: testOptions(), Servers: []string{server}, Node: "edge-1", TLS: tc, Tickets: store})
	require.NoError(t, err)
	return c
}

// connectOnce dials, makes a round trip, waits until the client holds the
// server's ticket (it arrives after the handshake), and closes.
func connectOnce(t *testing.T, c *Client, tr Transport) *Session {
	t.Helper()
	ctx, sess := dialTest(t, c)
	requireRoundTrip(ctx, t, sess, 1)
	require.Eventually(t, func() bool {
		_, ok := c.tickets[tr].Get("127.0.0.1")
		return ok
	}, 10*time.Second, 5*time.Millisecond, "no session ticket arrived")
	require.NoError(t, sess.Close("test"))
	<-sess.Done()
	return sess
}

func (s *testServer) resumptions(tr Transport, outcome string) float64 {
	return testutil.ToFloat64(s.metrics.Resumptions.WithLabelValues(string(tr), outcome))
}

// TestResumption: the second connection resumes the first's TLS session,
// its server side has the certificate's identity, and a client restarted
// on the same ticket store resumes too.
func TestResumption(t *testing.T) {
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ca := newTestCA(t)
			var p peers
			srv := startServer(t, ca, p.handler(), func(c *ServerConfig) { c.SessionTicketSecret = &testTicketSecret })
			tc := ca.clientTLS(t, certOpts{cn: "edge-1"})
			store := &memTickets{}
			c := resumeClient(t, srv.addr(tr), tc, store)

			first := connectOnce(t, c, tr)
			require.False(t, first.Resumed())
			full := p.last(t)

			_, sess := dialTest(t, c)
			require.True(t, sess.Resumed(), "second connection did a full handshake")
			got := p.last(t)
			require.Equal(t, full.Node, got.Node)
			require.Equal(t, full.Serial, got.Serial)
			require.True(t, full.NotAfter.Equal(got.NotAfter), "resumed session has another expiry")
			require.Eventually(t, func() bool { return srv.resumptions(tr, ticketResumed) == 1 }, 10*time.Second, 5*time.Millisecond)
			_ = sess.Close("test")

			restarted := resumeClient(t, srv.addr(tr), tc, store)
			_, sess = dialTest(t, restarted)
			require.True(t, sess.Resumed(), "a client restarted on the ticket store did a full handshake")
		})
	}
}

// TestNoResumptionWithoutSecret: without a ticket secret the server issues
// no tickets, so every handshake is a full one.
func TestNoResumptionWithoutSecret(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	c := resumeClient(t, srv.addr(TransportQUIC), ca.clientTLS(t, certOpts{cn: "edge-1"}), nil)
	for i := range 2 {
		ctx, sess := dialTest(t, c)
		requireRoundTrip(ctx, t, sess, uint64(i))
		require.False(t, sess.Resumed())
		_ = sess.Close("test")
	}
	_, ok := c.tickets[TransportQUIC].Get("127.0.0.1")
	require.False(t, ok, "the server issued a ticket without a secret")
}

// TestRevokedNodeCannotResume: a node disabled, rejoined (a new serial is the
// only one accepted) or whose certificate was revoked after its ticket was
// issued is not resumed: the ticket is declined, the full handshake that
// follows is refused, and the client drops its ticket.
func TestRevokedNodeCannotResume(t *testing.T) {
	cases := []struct {
		name   string
		refuse func(id Identity, serial string) error
	}{
		{"disabled", func(id Identity, _ string) error {
			if id.Node == "edge-1" {
				return errors.New("node disabled")
			}
			return nil
		}},
		{"rejoined", func(id Identity, serial string) error {
			if id.Serial == serial {
				return errors.New("superseded by a newer certificate")
			}
			return nil
		}},
	}
	for _, tr := range transports {
		for _, tc := range cases {
			t.Run(string(tr)+"/"+tc.name, func(t *testing.T) {
				ca := newTestCA(t)
				var revoked atomic.Bool
				cert := ca.issue(t, certOpts{cn: "edge-1"})
				leafSerial := serialOf(t, cert)
				srv := startServer(t, ca, echo, func(c *ServerConfig) {
					c.SessionTicketSecret = &testTicketSecret
					c.Authorize = func(id Identity) error {
						if revoked.Load() {
							return tc.refuse(id, leafSerial)
						}
						return nil
					}
				})
				clientTLS := &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: ca.pool, MinVersion: tls.VersionTLS13}
				store := &memTickets{}
				c := resumeClient(t, srv.addr(tr), clientTLS, store)
				connectOnce(t, c, tr)
				require.Equal(t, 1, store.len())

				revoked.Store(true)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				sess, err := c.Dial(ctx)
				if err == nil {
					_ = sess.Close("test")
				}
				require.Error(t, err, "a revoked node was let in")
				require.Equal(t, 1.0, srv.resumptions(tr, ticketNotAuthorized))
				require.Equal(t, 0.0, srv.resumptions(tr, ticketResumed))
				require.Equal(t, 1.0, srv.refused(tr, reasonAuthorize), "the full handshake was not refused by Authorize")
				require.Equal(t, 0, store.len(), "the client kept a ticket the server refused")

				revoked.Store(false) // re-enabled: a full handshake again
				_, sess = dialTest(t, c)
				require.False(t, sess.Resumed())
			})
		}
	}
}

// serialOf returns the serial of cert as the server sees it.
func serialOf(t *testing.T, cert tls.Certificate) string {
	t.Helper()
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	require.NoError(t, err)
	return identityOf(leaf).Serial
}

// TestResumedSessionEndsAtCertificateExpiry: a resumed session carries the
// certificate's expiry (the cloud ends sessions then), and once the
// certificate has expired its ticket does not resume: the client is refused.
func TestResumedSessionEndsAtCertificateExpiry(t *testing.T) {
	ca := newTestCA(t)
	notAfter := time.Now().Add(time.Hour).Truncate(time.Second)
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	var p peers
	srv := startServer(t, ca, p.handler(), func(c *ServerConfig) {
		c.SessionTicketSecret = &testTicketSecret
		c.TicketRotation = 24 * time.Hour
		c.Now = func() time.Time { return time.Unix(0, now.Load()) }
	})
	c := resumeClient(t, srv.addr(TransportQUIC), ca.clientTLS(t, certOpts{cn: "edge-1", notAfter: notAfter}), nil)
	connectOnce(t, c, TransportQUIC)
	_, sess := dialTest(t, c)
	require.True(t, sess.Resumed())
	require.True(t, p.last(t).NotAfter.Equal(notAfter), "resumed session's expiry is %s, want %s", p.last(t).NotAfter, notAfter)
	_ = sess.Close("test")
	<-sess.Done()

	now.Store(notAfter.Add(time.Minute).UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sess, err := c.Dial(ctx)
	if err == nil {
		_ = sess.Close("test")
	}
	require.Error(t, err, "an expired certificate's ticket was resumed")
	require.Equal(t, 1.0, srv.refused(TransportQUIC, reasonCertificate))
}

// TestTicketAcceptedByOtherReplica: replicas given the same secret accept
// each other's tickets; one with another secret declines it.
func TestTicketAcceptedByOtherReplica(t *testing.T) {
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ca := newTestCA(t)
			withSecret := func(k *[32]byte) func(*ServerConfig) {
				return func(c *ServerConfig) { c.SessionTicketSecret = k }
			}
			a := startServer(t, ca, echo, withSecret(&testTicketSecret))
			b := startServer(t, ca, echo, withSecret(&testTicketSecret))
			other := [32]byte{9}
			o := startServer(t, ca, echo, withSecret(&other))
			tc := ca.clientTLS(t, certOpts{cn: "edge-1"})
			store := &memTickets{}
			connectOnce(t, resumeClient(t, a.addr(tr), tc, store), tr)

			_, sess := dialTest(t, resumeClient(t, b.addr(tr), tc, store))
			require.True(t, sess.Resumed(), "replica B did not resume replica A's session")
			require.Eventually(t, func() bool { return b.resumptions(tr, ticketResumed) == 1 }, 10*time.Second, 5*time.Millisecond)

			// A replica with another secret declines the ticket and
			// refuses the classical handshake that would follow; the
			// client drops the ticket, and its next attempt is a full
			// hybrid handshake.
			co := resumeClient(t, o.addr(tr), tc, store)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := co.Dial(ctx)
			require.Error(t, err, "a replica with another secret completed a classical handshake")
			require.Equal(t, 1.0, o.resumptions(tr, ticketUnknown))
			require.Equal(t, 1.0, o.refused(tr, reasonTicketDeclined))
			require.Equal(t, 0, store.len(), "the client kept a ticket the server declined")
			_, sess = dialTest(t, co)
			require.False(t, sess.Resumed())
			require.Equal(t, tls.X25519MLKEM768, sess.curve)
		})
	}
}

// TestResumptionKeyExchange: a full handshake uses the hybrid post-quantum
// key exchange; a client offering a ticket offers X25519 alone (a smaller
// ClientHello), which the resumed session uses.
func TestResumptionKeyExchange(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.SessionTicketSecret = &testTicketSecret })
	c := resumeClient(t, srv.addr(TransportQUIC), ca.clientTLS(t, certOpts{cn: "edge-1"}), nil)
	first := connectOnce(t, c, TransportQUIC)
	_, second := dialTest(t, c)
	require.True(t, second.Resumed())
	require.Equal(t, tls.X25519MLKEM768, first.curve)
	require.Equal(t, tls.X25519, second.curve)
}

// TestTicketRenewedInNextEpoch: a resumed session gets a new ticket, so
// that a client that reconnects at least once per rotation keeps resuming
// after its first ticket's epochs have passed.
func TestTicketRenewedInNextEpoch(t *testing.T) {
	ca := newTestCA(t)
	start := time.Now().Truncate(time.Hour).Add(time.Minute)
	var now atomic.Int64
	now.Store(start.UnixNano())
	srv := startServer(t, ca, echo, func(c *ServerConfig) {
		c.SessionTicketSecret = &testTicketSecret
		c.TicketRotation = time.Hour
		c.Now = func() time.Time { return time.Unix(0, now.Load()) }
	})
	store := &memTickets{}
	c := resumeClient(t, srv.addr(TransportQUIC), ca.clientTLS(t, certOpts{cn: "edge-1", notAfter: start.Add(4 * time.Hour)}), store)
	connectOnce(t, c, TransportQUIC)
	issued := store.snapshot()

	resume := func() {
		t.Helper()
		ctx, sess := dialTest(t, c)
		require.True(t, sess.Resumed())
		requireRoundTrip(ctx, t, sess, 7)
		_ = sess.Close("test")
		<-sess.Done()
	}
	now.Store(start.Add(time.Hour).UnixNano()) // the next epoch
	resume()
	require.Eventually(t, func() bool { return store.snapshot() != issued }, 10*time.Second, 5*time.Millisecond,
		"no new ticket on a resumption")

	now.Store(start.Add(2 * time.Hour).UnixNano()) // the first ticket's epoch is gone
	resume()
}

// TestRenewedCertificateDoesNotResume: after the client's certificate
// changed, its ticket (issued to the old one) is not offered.
func TestRenewedCertificateDoesNotResume(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.SessionTicketSecret = &testTicketSecret })
	var cur atomic.Pointer[tls.Certificate]
	first := ca.issue(t, certOpts{cn: "edge-1"})
	cur.Store(&first)
	tc := &tls.Config{
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cur.Load(), nil },
		RootCAs:              ca.pool, MinVersion: tls.VersionTLS13,
	}
	c := resumeClient(t, srv.addr(TransportQUIC), tc, nil)
	connectOnce(t, c, TransportQUIC)
	renewed := ca.issue(t, certOpts{cn: "edge-1"})
	cur.Store(&renewed)
	_, sess := dialTest(t, c)
	require.False(t, sess.Resumed(), "resumed with a ticket of the previous certificate")
}

// TestTicketKeysRotate: a ticket opens in the epoch it was sealed in and
// the next one, not later, and not under another secret.
func TestTicketKeysRotate(t *testing.T) {
	var now time.Time
	k := &ticketSealer{secret: testTicketSecret, period: time.Hour, now: func() time.Time { return now }}
	now = time.Unix(1_000_000*3600+1800, 0) // the middle of an epoch
	ticket, err := k.seal([]byte("state"))
	require.NoError(t, err)
	for _, tc := range []struct {
		after time.Duration
		ok    bool
	}{{0, true}, {time.Hour, true}, {2 * time.Hour, false}} {
		now = time.Unix(1_000_000*3600+1800, 0).Add(tc.after)
		got, current, err := k.open(ticket)
		if tc.ok {
			require.NoError(t, err, "after %s", tc.after)
			require.Equal(t, "state", string(got))
			require.Equal(t, tc.after == 0, current, "after %s", tc.after)
		} else {
			require.ErrorIs(t, err, errTicketUnknown, "after %s", tc.after)
		}
	}
	now = time.Unix(1_000_000*3600+1800, 0)
	other := &ticketSealer{secret: [32]byte{7}, period: time.Hour, now: k.now}
	_, _, err = other.open(ticket)
	require.ErrorIs(t, err, errTicketUnknown)
	damaged := append([]byte(nil), ticket...)
	damaged[len(damaged)-1] ^= 1
	_, _, err = k.open(damaged)
	require.ErrorIs(t, err, errTicketUnknown)
	_, _, err = k.open([]byte(strings.Repeat("x", 5)))
	require.ErrorIs(t, err, errTicketUnknown)
}

// blackhole returns an address of tr's scheme on loopback where nothing
// answers: a UDP socket that reads and drops, or a TCP listener that
// accepts and never speaks (a path that silently drops, as in an outage).
func blackhole(t *testing.T, tr Transport) string {
	t.Helper()
	if tr == TransportQUIC {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		t.Cleanup(func() { _ = pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				if _, _, err := pc.ReadFrom(buf); err != nil {
					return
				}
			}
		}()
		return "quic://" + pc.LocalAddr().String()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	return "wss://" + ln.Addr().String()
}

// TestTicketSurvivesUnansweredDial: a dial that times out on a path that
// drops everything keeps the ticket it offered, so that the first dial
// after the outage resumes. Before the fix crypto/tls's own rule (forget a
// ticket on any failed handshake that offered it) emptied the cache and
// the store, and every reconnect after an outage was a full handshake:
// about 1.2 kB more down and 1.3 kB more up on QUIC.
func TestTicketSurvivesUnansweredDial(t *testing.T) {
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ca := newTestCA(t)
			srv := startServer(t, ca, echo, func(c *ServerConfig) { c.SessionTicketSecret = &testTicketSecret })
			tc := ca.clientTLS(t, certOpts{cn: "edge-1"})
			store := &memTickets{}
			connectOnce(t, resumeClient(t, srv.addr(tr), tc, store), tr)
			require.Equal(t, 1, store.len())

			lost, err := NewClient(ClientConfig{Options: testOptions(), Servers: []string{blackhole(t, tr)}, Node: "edge-1", TLS: tc,
				Tickets: store, DialTimeout: 300 * time.Millisecond})
			require.NoError(t, err)
			_, err = lost.Dial(t.Context())
			require.Error(t, err, "nothing answers there")
			require.Equal(t, 1, store.len(), "the ticket went with the unanswered dial")
			_, ok := lost.tickets[tr].Get("127.0.0.1")
			require.True(t, ok, "the client forgot its ticket")

			_, sess := dialTest(t, resumeClient(t, srv.addr(tr), tc, store))
			require.True(t, sess.Resumed(), "the first dial after the outage did a full handshake")
		})
	}
}

// TestResumptionKeepsTicket: a connection that resumes a ticket of the
// current epoch gets the 13-byte ticketKeep label instead of a new ticket
// (about 650 B down on every reconnect before), the client keeps its
// ticket, byte for byte, and resumes with it again.
func TestResumptionKeepsTicket(t *testing.T) {
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ca := newTestCA(t)
			srv := startServer(t, ca, echo, func(c *ServerConfig) { c.SessionTicketSecret = &testTicketSecret })
			store := &memTickets{}
			c := resumeClient(t, srv.addr(tr), ca.clientTLS(t, certOpts{cn: "edge-1"}), store)
			connectOnce(t, c, tr)
			issued := store.snapshot()
			for i := range 2 {
				ctx, sess := dialTest(t, c)
				require.True(t, sess.Resumed(), "reconnect %d did a full handshake", i)
				// The ticket message comes before the echo's answer: once
				// that arrived, the ticket (or the label) was handled.
				requireRoundTrip(ctx, t, sess, uint64(i))
				require.Equal(t, issued, store.snapshot(), "reconnect %d replaced the ticket", i)
				_ = sess.Close("test")
				<-sess.Done()
			}
		})
	}
}

// TestNewTicketForClientsThatDoNotKeep: a connection whose client did not
// offer alpnKeepTicket (an older EdgeCore) gets a sealed ticket on a
// resumption, never the label it would not understand.
func TestNewTicketForClientsThatDoNotKeep(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.SessionTicketSecret = &testTicketSecret })
	tc := ca.clientTLS(t, certOpts{cn: "edge-1"})
	tc.ClientSessionCache = tls.NewLRUClientSessionCache(1)
	tc.NextProtos = []string{alpnQUIC}
	tc.ServerName = "127.0.0.1"
	var labels [][]byte
	for range 2 {
		conn, err := tls.Dial("tcp", srv.WebSocketAddr().String(), func() *tls.Config { c := tc.Clone(); c.NextProtos = []string{"http/1.1"}; return c }())
		require.NoError(t, err)
		// Reading makes the client handle the ticket that follows the
		// handshake; the server answers nothing to a silent client, so
		// a short deadline ends the read.
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(200*time.Millisecond)))
		_, _ = conn.Read(make([]byte, 1))
		cs, ok := tc.ClientSessionCache.Get("127.0.0.1")
		require.True(t, ok, "no ticket")
		label, _, err := cs.ResumptionState()
		require.NoError(t, err)
		labels = append(labels, label)
		_ = conn.Close()
	}
	require.NotEqual(t, ticketKeep, labels[1], "a client that does not keep tickets was told to")
	require.Greater(t, len(labels[1]), 100, "the resumption got a sealed ticket")
}
