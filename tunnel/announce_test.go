package tunnel

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
)

// requireLargeEchoes sends n messages over the large-message threshold
// and checks that the echo handler answers each with its payload (the
// answer is large too, so both directions carry a large message).
func requireLargeEchoes(t *testing.T, s *Session, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range n {
		id := uint64(1000 + i)
		payload := make([]byte, 64<<10)
		payload[0], payload[len(payload)-1] = byte(i), byte(i)
		require.NoError(t, s.Send(ctx, &message.Message{ID: id, Kind: message.KindEvent, Op: message.OpUpsert, Payload: payload}))
		m, err := s.Recv(ctx)
		require.NoError(t, err)
		require.Equal(t, id, m.ReplyTo)
		require.Equal(t, payload, m.Payload)
	}
}

// TestLargeMessagesAcrossVersions: a client and a server of this version
// negotiate alpnQUICAnnounced and announce their large-message streams;
// with an end of an older version (Options.unannounced: alpnQUIC alone,
// streams neither announced nor expected) they fall back to alpnQUIC and
// the acceptor goroutine. Large messages travel both ways in all four
// pairings.
func TestLargeMessagesAcrossVersions(t *testing.T) {
	ca := newTestCA(t)
	for _, tc := range []struct {
		oldServer, oldClient bool
		want                 string
	}{
		{false, false, alpnQUICAnnounced},
		{false, true, alpnQUIC},
		{true, false, alpnQUIC},
		{true, true, alpnQUIC},
	} {
		t.Run(fmt.Sprintf("old_server=%v/old_client=%v", tc.oldServer, tc.oldClient), func(t *testing.T) {
			srv := startServer(t, ca, echo, func(c *ServerConfig) { c.unannounced = tc.oldServer })
			opts := testOptions()
			opts.unannounced = tc.oldClient
			c, err := NewClient(ClientConfig{
				Options: opts,
				Servers: []string{srv.addr(TransportQUIC)},
				Node:    "edge-1",
				TLS:     ca.clientTLS(t, certOpts{cn: "edge-1"}),
			})
			require.NoError(t, err)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sess, err := c.Dial(ctx)
			require.NoError(t, err)
			defer sess.Close("test done")
			l := sess.link.(*quicLink)
			require.Equal(t, tc.want, l.conn.ConnectionState().TLS.NegotiatedProtocol)
			require.Equal(t, tc.want == alpnQUICAnnounced, l.announced)
			requireLargeEchoes(t, sess, 3)
			requireSessionEchoes(t, sess)
		})
	}
}

// TestBadAnnouncements: an announcement on a session that did not
// negotiate them, and more announcements of streams that never come than
// maxAnnounced, each end the session as a counted bad frame.
func TestBadAnnouncements(t *testing.T) {
	ca := newTestCA(t)
	announce := mustFrame(t, &message.Message{Kind: message.KindStreamOpen})
	requireClosed := func(t *testing.T, srv *testServer, before float64, done <-chan struct{}) {
		t.Helper()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Fatal("server did not close the connection")
		}
		require.Eventually(t, func() bool { return srv.refused(TransportQUIC, reasonFrame) > before }, 10*time.Second, 10*time.Millisecond)
	}
	t.Run("not negotiated", func(t *testing.T) {
		srv := startServer(t, ca, echo, func(c *ServerConfig) { c.unannounced = true })
		before := srv.refused(TransportQUIC, reasonFrame)
		conn, st := rawSession(t, srv, "edge-1")
		require.Equal(t, alpnQUIC, conn.ConnectionState().TLS.NegotiatedProtocol)
		_, err := st.Write(announce)
		require.NoError(t, err)
		requireClosed(t, srv, before, conn.Context().Done())
	})
	t.Run("too many", func(t *testing.T) {
		srv := startServer(t, ca, echo, nil)
		before := srv.refused(TransportQUIC, reasonFrame)
		conn, st := rawSession(t, srv, "edge-1")
		for range maxAnnounced + 1 {
			_, err := st.Write(announce)
			require.NoError(t, err)
		}
		requireClosed(t, srv, before, conn.Context().Done())
	})
}
