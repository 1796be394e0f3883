package tunnel

import (
	"bytes"
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestIdleSessionHoldsOnlyItsReaders: once a session has nothing to send,
// its goroutines, at both ends, are those blocked reading its transport
// and the server's handler: no writer, no goroutine waiting to close the
// link or for the others to exit, no WebSocket ping goroutine, no QUIC
// large-message stream acceptor (the streams are announced: quic.go). On
// QUIC that is the control-stream reader at each end, plus the handler:
// 3 (5 with the acceptors, before alpnQUICAnnounced). On WebSocket, the
// reader at each end plus the handler: 3. (Before issue 10 both were 11.)
// Messages, large ones included, still flow
// afterwards, which starts the writers again, and closing leaves nothing.
func TestIdleSessionHoldsOnlyItsReaders(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	// The server starts its accept loops asynchronously, and a transport's
	// first session may start more of its own: one session on each, closed
	// again, and a count that has stopped moving, before anything is
	// counted.
	for _, tr := range []Transport{TransportQUIC, TransportWebSocket} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		sess, err := newTestClient(t, ca, "edge-0", srv.addr(tr)).Dial(ctx)
		cancel()
		require.NoError(t, err)
		requireSessionEchoes(t, sess)
		require.NoError(t, sess.Close("warm-up"))
	}
	stableTunnelGoroutines()
	for _, tc := range []struct {
		tr   Transport
		want int
	}{{TransportQUIC, 3}, {TransportWebSocket, 3}} {
		t.Run(string(tc.tr), func(t *testing.T) {
			before := tunnelGoroutines()
			c := newTestClient(t, ca, "edge-1", srv.addr(tc.tr))
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sess, err := c.Dial(ctx)
			require.NoError(t, err)
			requireSessionEchoes(t, sess) // both writers have run
			require.LessOrEqual(t, settleTunnelGoroutines(before+tc.want)-before, tc.want,
				"goroutines an idle %s session holds in the tunnel's code", tc.tr)
			requireSessionEchoes(t, sess)
			requireLargeEchoes(t, sess, 2)
			require.LessOrEqual(t, settleTunnelGoroutines(before+tc.want)-before, tc.want,
				"goroutines of an idle %s session after large messages", tc.tr)
			require.NoError(t, sess.Close("done"))
			require.LessOrEqual(t, settleTunnelGoroutines(before), before, "goroutines left after the session closed")
		})
	}
}

// settleTunnelGoroutines waits up to 30s for tunnelGoroutines to drop to
// at most limit and returns the last count. It polls in the calling
// goroutine (require.Eventually would add one of its own to the count).
func settleTunnelGoroutines(limit int) int {
	n := tunnelGoroutines()
	for deadline := time.Now().Add(30 * time.Second); n > limit && time.Now().Before(deadline); n = tunnelGoroutines() {
		time.Sleep(10 * time.Millisecond) // polling interval, as in require.Eventually
	}
	return n
}

// stableTunnelGoroutines waits, up to 30 s, until tunnelGoroutines has
// not changed for half a second.
func stableTunnelGoroutines() {
	n, since := tunnelGoroutines(), time.Now()
	for deadline := time.Now().Add(30 * time.Second); time.Since(since) < 500*time.Millisecond && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond) // polling interval, as in require.Eventually
		if m := tunnelGoroutines(); m != n {
			n, since = m, time.Now()
		}
	}
}

// tunnelGoroutines counts the goroutines with a function of this package
// on their stack (the caller's own included).
func tunnelGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for g := range bytes.SplitSeq(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("tetheredge/tether/tunnel.")) {
			count++
		}
	}
	return count
}
