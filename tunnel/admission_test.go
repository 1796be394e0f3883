package tunnel

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/require"
)

// TestHandshakeAdmission: with MaxHandshakes in flight, a new QUIC
// connection is refused at once with CONNECTION_REFUSED and counted; the
// token comes back when the held handshake ends (here: the client goes
// away before its hello), after a refused TLS handshake, and after a
// session's hello, so that sessions one after another all get in.
func TestHandshakeAdmission(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) {
		c.MaxHandshakes = 1
		c.HandshakeTimeout = 20 * time.Second // the held handshake does not end by itself during the test
	})

	// A client that completes TLS and never says hello holds the one token.
	held, _ := rawQUIC(t, srv, "edge-slow")
	addr := srv.QUICAddr().String()
	dial := func(node string) error {
		c := newTestClient(t, ca, node, srv.addr(TransportQUIC))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := quic.DialAddr(ctx, addr, c.tlsConfig(TransportQUIC, addr), quicConfig(testOptions(), 5*time.Second))
		if err == nil {
			_ = conn.CloseWithError(0, "")
		}
		return err
	}
	err := dial("edge-2")
	var terr *quic.TransportError
	require.ErrorAs(t, err, &terr, "refused while the token is held")
	require.Equal(t, quic.ConnectionRefused, terr.ErrorCode)
	// Each of the client's Initial datagrams (its ML-KEM key share
	// spans two) is refused alone.
	busy := srv.refused(TransportQUIC, reasonBusy)
	require.GreaterOrEqual(t, busy, 1.0)

	// The held connection goes away: its token comes back.
	require.NoError(t, held.CloseWithError(0, "gone"))
	require.Eventually(t, func() bool { return len(srv.handshakes) == 0 }, 10*time.Second, 10*time.Millisecond)

	// A refused TLS handshake gives its token back.
	bad, err := NewClient(ClientConfig{Options: testOptions(), Servers: []string{srv.addr(TransportQUIC)}, Node: "edge-1",
		TLS: &tls.Config{RootCAs: ca.pool}, DialTimeout: 2 * time.Second})
	require.NoError(t, err)
	_, err = bad.Dial(context.Background())
	require.Error(t, err)
	require.Eventually(t, func() bool { return len(srv.handshakes) == 0 }, 10*time.Second, 10*time.Millisecond)

	// Sessions one after another: each gives its token back after its
	// hello, while it lives on.
	var sessions []*Session
	for _, node := range []string{"edge-a", "edge-b", "edge-c"} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		sess, err := newTestClient(t, ca, node, srv.addr(TransportQUIC)).Dial(ctx)
		cancel()
		require.NoError(t, err, "session of %s", node)
		sessions = append(sessions, sess)
	}
	for _, s := range sessions {
		require.NoError(t, s.Close("done"))
	}
	require.Equal(t, busy, srv.refused(TransportQUIC, reasonBusy), "no refusal with the token free")
	requireServes(t, srv)
}

// TestHandshakeAdmissionUnbounded: a negative MaxHandshakes admits every
// connection.
func TestHandshakeAdmissionUnbounded(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.MaxHandshakes = -1 })
	require.Nil(t, srv.handshakes)
	for _, node := range []string{"edge-a", "edge-b"} {
		conn, _ := rawQUIC(t, srv, node)
		require.NoError(t, conn.Context().Err())
	}
	require.Zero(t, srv.refused(TransportQUIC, reasonBusy))
}
