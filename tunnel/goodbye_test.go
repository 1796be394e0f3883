package tunnel

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
)

// TestGoodbyeMovesToHint: on every transport, a server that says goodbye
// with a hint makes the client close the session at once (well before the
// grace) and connect to the hinted server next, skipping the one after
// the first in its list; the session's user never sees the goodbye. A
// hint that is not one of the client's servers is ignored: the client
// goes on with its list.
func TestGoodbyeMovesToHint(t *testing.T) {
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ca := newTestCA(t)
			var hint atomic.Pointer[string]
			var seenByUser atomic.Int32
			served := make(chan string, 8) // which server each session reached
			serve := func(name string, bye bool) Handler {
				return HandlerFunc(func(ctx context.Context, s *Session) {
					served <- name
					if bye {
						// Grace far beyond the test's wait: the client,
						// not the timer, ends the session.
						require.NoError(t, s.Goodbye(ctx, "rebalance", *hint.Load(), time.Hour))
					}
					for {
						m, err := s.Recv(ctx)
						if err != nil {
							return
						}
						if m.Kind == message.KindGoodbye {
							seenByUser.Add(1)
						}
					}
				})
			}
			a := startServer(t, ca, serve("a", true), nil)
			b := startServer(t, ca, serve("b", false), nil)
			c := startServer(t, ca, serve("c", false), nil)
			hint.Store(new(c.addr(tr)))
			client := newTestClient(t, ca, "edge-1", a.addr(tr), b.addr(tr), c.addr(tr))
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			var clientSaw atomic.Int32
			go func() {
				done <- client.Run(ctx, func(ctx context.Context, s *Session) error {
					for {
						m, err := s.Recv(ctx)
						if err != nil {
							return nil
						}
						if m.Kind == message.KindGoodbye {
							clientSaw.Add(1)
						}
					}
				})
			}()
			require.Equal(t, "a", <-served)
			require.Equal(t, "c", <-served, "the hint, not the next server in the list")
			cancel()
			require.NoError(t, <-done)
			require.Zero(t, clientSaw.Load(), "the goodbye is the tunnel's own")
			require.Zero(t, seenByUser.Load())

			// A hint the client was not given: it moves on in its list.
			hint.Store(new("quic://192.0.2.1:10000"))
			client = newTestClient(t, ca, "edge-1", a.addr(tr), b.addr(tr), c.addr(tr))
			ctx, cancel = context.WithCancel(context.Background())
			go func() {
				done <- client.Run(ctx, func(ctx context.Context, s *Session) error { <-s.Done(); return nil })
			}()
			require.Equal(t, "a", <-served)
			require.Equal(t, "b", <-served, "an unknown hint is ignored")
			cancel()
			require.NoError(t, <-done)
		})
	}
}

// TestGoodbyeGraceClosesAnIgnoringPeer: a peer that does not act on a
// goodbye (here a raw session that delivers it like any message, as an
// older edge's syncer refuses it) is closed by the server after the grace.
func TestGoodbyeGraceClosesAnIgnoringPeer(t *testing.T) {
	ca := newTestCA(t)
	ended := make(chan error, 1)
	srv := startServer(t, ca, HandlerFunc(func(ctx context.Context, s *Session) {
		require.NoError(t, s.Goodbye(ctx, "rebalance", "", 300*time.Millisecond))
		<-s.Done()
		ended <- s.Err()
	}), nil)
	client := newTestClient(t, ca, "edge-1", srv.addr(TransportQUIC))
	client.ignoreGoodbye = true // as an older edge: the goodbye is just a message
	sess, err := client.Dial(context.Background())
	require.NoError(t, err)
	m, err := sess.Recv(context.Background())
	if err == nil {
		require.Equal(t, message.KindGoodbye, m.Kind)
	}
	select {
	case err := <-ended:
		require.ErrorContains(t, err, "goodbye not honoured")
	case <-time.After(30 * time.Second):
		t.Fatal("the server did not close the session after the grace")
	}
	require.NoError(t, sess.Close("done"))
}
