package tunnel

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
)

// largestDatagram forwards one QUIC client's datagrams to target and back,
// and keeps the size of the largest it saw either way.
type largestDatagram struct {
	front, back *net.UDPConn
	largest     atomic.Int64
	wg          sync.WaitGroup
}

func startLargestDatagram(t *testing.T, target string) *largestDatagram {
	t.Helper()
	front, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	taddr, err := net.ResolveUDPAddr("udp", target)
	require.NoError(t, err)
	back, err := net.DialUDP("udp", nil, taddr)
	require.NoError(t, err)
	r := &largestDatagram{front: front, back: back}
	var client atomic.Pointer[net.UDPAddr]
	pump := func(read func([]byte) (int, error), write func([]byte) error) {
		buf := make([]byte, 64<<10)
		for {
			n, err := read(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				continue
			}
			for cur := r.largest.Load(); int64(n) > cur && !r.largest.CompareAndSwap(cur, int64(n)); cur = r.largest.Load() {
			}
			_ = write(buf[:n])
		}
	}
	r.wg.Go(func() {
		pump(func(b []byte) (int, error) {
			n, from, err := front.ReadFromUDP(b)
			if err == nil {
				client.Store(from)
			}
			return n, err
		}, func(b []byte) error { _, err := back.Write(b); return err })
	})
	r.wg.Go(func() {
		pump(back.Read, func(b []byte) error {
			if to := client.Load(); to != nil {
				_, err := front.WriteToUDP(b, to)
				return err
			}
			return nil
		})
	})
	t.Cleanup(func() { _ = front.Close(); _ = back.Close(); r.wg.Wait() })
	return r
}

// TestPathMTUDiscovery: by default no datagram grows past the 1,280 B
// quic-go starts with, even under a bulk transfer (no probes are sent);
// with PathMTUDiscovery on both ends, larger ones appear.
func TestPathMTUDiscovery(t *testing.T) {
	for _, discover := range []bool{false, true} {
		name := "off"
		if discover {
			name = "on"
		}
		t.Run(name, func(t *testing.T) {
			ca := newTestCA(t)
			srv := startServer(t, ca, echo, func(c *ServerConfig) { c.PathMTUDiscovery = discover })
			relay := startLargestDatagram(t, srv.QUICAddr().String())
			opts := testOptions()
			opts.PathMTUDiscovery = discover
			ctx, sess := dialTest(t, newOptionsClient(t, ca, opts, "quic://"+relay.front.LocalAddr().String()))
			payload := make([]byte, 128<<10)
			for i := range 8 {
				require.NoError(t, sess.Send(ctx, &message.Message{Kind: message.KindEvent, Op: message.OpUpsert, ID: uint64(i + 1), Payload: payload}))
				if discover && relay.largest.Load() > 1280 {
					return
				}
			}
			requireRoundTrip(ctx, t, sess, 100)
			if discover {
				require.Eventually(t, func() bool { return relay.largest.Load() > 1280 }, 10*time.Second, 10*time.Millisecond,
					"path-MTU discovery never raised the datagram size")
				return
			}
			require.LessOrEqual(t, relay.largest.Load(), int64(1280), "a datagram over 1,280 B: path-MTU probes were sent")
		})
	}
}
