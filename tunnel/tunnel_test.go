package tunnel

import (
	"context"
	"log/slog"
	"net"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/tests/netproxy"
	"github.com/tetheredge/tether/tests/testlog"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func testOptions() Options {
	return Options{
		KeepAlive:        200 * time.Millisecond,
		DeadPeerTimeout:  2 * time.Second,
		HandshakeTimeout: 2 * time.Second,
		Logger:           testlog.New(),
	}
}

// testServer runs a tunnel server on loopback until the test ends.
type testServer struct {
	*Server
	ca  *testCA
	reg *prometheus.Registry
}

func startServer(t testing.TB, ca *testCA, h Handler, mutate func(*ServerConfig)) *testServer {
	t.Helper()
	srv, err := tryStartServer(t, ca, h, mutate)
	require.NoError(t, err)
	return srv
}

// tryStartServer is startServer, returning the error of binding the
// listeners.
func tryStartServer(t testing.TB, ca *testCA, h Handler, mutate func(*ServerConfig)) (*testServer, error) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg := ServerConfig{
		Options:       testOptions(),
		QUICAddr:      "127.0.0.1:0",
		WebSocketAddr: "127.0.0.1:0",
		TLS:           ca.serverTLS(t),
		Handler:       h,
	}
	cfg.Registerer = reg
	if mutate != nil {
		mutate(&cfg)
	}
	srv, err := NewServer(cfg)
	require.NoError(t, err)
	if err := srv.Listen(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	// QUIC handshakes wait for Run's listener (TestNoHandshakeBeforeRun):
	// tests with short dial timeouts start once it is there.
	require.Eventually(t, srv.quicListening, 30*time.Second, time.Millisecond)
	return &testServer{Server: srv, ca: ca, reg: reg}, nil
}

// addr returns the address a client uses for a transport.
func (s *testServer) addr(tr Transport) string {
	if tr == TransportQUIC {
		return "quic://" + s.QUICAddr().String()
	}
	return "wss://" + s.WebSocketAddr().String()
}

func (s *testServer) refused(tr Transport, reason string) float64 {
	return testutil.ToFloat64(s.metrics.Refused.WithLabelValues(string(tr), reason))
}

func newTestClient(t *testing.T, ca *testCA, node string, servers ...string) *Client {
	t.Helper()
	c, err := NewClient(ClientConfig{
		Options: testOptions(),
		Servers: servers,
		Node:    node,
		TLS:     ca.clientTLS(t, certOpts{cn: node}),
	})
	require.NoError(t, err)
	return c
}

// echo answers every message with an ack naming it, carrying its payload.
var echo = HandlerFunc(func(ctx context.Context, s *Session) {
	for {
		m, err := s.Recv(ctx)
		if err != nil {
			return
		}
		reply := &message.Message{Kind: message.KindAck, ReplyTo: m.ID, Node: s.Peer().Node, Payload: m.Payload}
		if err := s.Send(ctx, reply); err != nil {
			return
		}
	}
})

var transports = []Transport{TransportQUIC, TransportWebSocket}

func TestSessionEcho(t *testing.T) {
	ca := newTestCA(t)
	// Liveness bounds far above the echoes' times: this test is about what
	// arrives, and under -race at load 30 a 3 MiB echo on QUIC starved a
	// connection past testOptions' 2 s dead-peer timeout once in 50 runs.
	opts := testOptions()
	opts.HandshakeTimeout, opts.KeepAlive, opts.DeadPeerTimeout = 30*time.Second, time.Second, 30*time.Second
	srv := startServer(t, ca, echo, func(c *ServerConfig) { o := opts; o.Registerer = c.Registerer; c.Options = o })
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c := newOptionsClient(t, ca, opts, srv.addr(tr))
			sess, err := c.Dial(ctx)
			require.NoError(t, err)
			defer sess.Close("test done")
			require.Equal(t, tr, sess.Transport())
			require.NotEmpty(t, sess.ID())

			sizes := []int{0, 1, 256, 4 << 10, 100 << 10, 3 << 20}
			for i, n := range sizes {
				payload := make([]byte, n)
				for j := range payload {
					payload[j] = byte(i + j)
				}
				// Each echo has its own bound, far above its time: 3 MiB
				// each way took 1-8 s under -race at load 35 (18:57,
				// 2026-12-01), and past a shared 10 s bound once.
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				start := time.Now()
				require.NoError(t, sess.Send(ctx, &message.Message{ID: uint64(i + 1), Kind: message.KindEvent, Op: message.OpUpsert, Payload: payload}))
				got, err := sess.Recv(ctx)
				cancel()
				require.NoError(t, err)
				require.Equal(t, message.KindAck, got.Kind)
				require.Equal(t, uint64(i+1), got.ReplyTo)
				require.Equal(t, "edge-1", got.Node, "server sees the certificate's node")
				require.Len(t, got.Payload, n)
				t.Logf("%d bytes echoed in %s", n, time.Since(start))
				if n > 0 {
					require.Equal(t, payload, got.Payload)
				}
			}
		})
	}
}

func TestManyMessagesInOrderOnControlPath(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			sess, err := newTestClient(t, ca, "edge-1", srv.addr(tr)).Dial(ctx)
			require.NoError(t, err)
			defer sess.Close("test done")
			const n = 5000
			errc := make(chan error, 1)
			go func() {
				for i := 1; i <= n; i++ {
					if err := sess.Send(ctx, &message.Message{ID: uint64(i), Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, 256)}); err != nil {
						errc <- err
						return
					}
				}
				errc <- nil
			}()
			for i := 1; i <= n; i++ {
				m, err := sess.Recv(ctx)
				require.NoError(t, err)
				require.Equal(t, uint64(i), m.ReplyTo, "small messages keep their order")
			}
			require.NoError(t, <-errc)
		})
	}
}

// TestLargeMessageDoesNotBlockSmall sends a large message and then small
// ones on QUIC: the small ones travel on the prioritised control stream and
// overtake the large one, which has its own stream.
func TestLargeMessageDoesNotBlockSmall(t *testing.T) {
	ca := newTestCA(t)
	got := make(chan *message.Message, 100)
	srv := startServer(t, ca, HandlerFunc(func(ctx context.Context, s *Session) {
		for {
			m, err := s.Recv(ctx)
			if err != nil {
				return
			}
			got <- m
		}
	}), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sess, err := newTestClient(t, ca, "edge-1", srv.addr(TransportQUIC)).Dial(ctx)
	require.NoError(t, err)
	defer sess.Close("test done")

	const large = 4<<20 - 1024
	sent := make(chan error, 1)
	go func() {
		sent <- sess.Send(ctx, &message.Message{ID: 1, Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, large)})
	}()
	// Wait until the large message is on the wire, then send small ones.
	require.Eventually(t, func() bool {
		return sess.link.(*quicLink).conn.ConnectionStats().BytesSent > 256<<10
	}, 10*time.Second, time.Millisecond)
	for i := 2; i <= 11; i++ {
		require.NoError(t, sess.Send(ctx, &message.Message{ID: uint64(i), Kind: message.KindEvent, Op: message.OpUpsert, Payload: []byte("small")}))
	}
	var order []uint64
	for range 11 {
		select {
		case m := <-got:
			order = append(order, m.ID)
		case <-ctx.Done():
			t.Fatal("messages did not arrive")
		}
	}
	require.NoError(t, <-sent)
	require.NotEqual(t, uint64(1), order[0], "the large message should not hold up the small ones: order %v", order)
	require.Contains(t, order, uint64(1))
}

func TestStreams(t *testing.T) {
	ca := newTestCA(t)
	const size = 2 << 20
	pattern := func(i int) byte { return byte(i * 7) }
	// The server echoes every stream the client opens, and opens one to the
	// client after each session starts, sending `size` bytes.
	srv := startServer(t, ca, HandlerFunc(func(ctx context.Context, s *Session) {
		st, err := s.OpenStream(ctx)
		if err != nil {
			return
		}
		buf := make([]byte, size)
		for i := range buf {
			buf[i] = pattern(i)
		}
		_, _ = st.Write(buf)
		_ = st.Close()
		for {
			in, err := s.AcceptStream(ctx)
			if err != nil {
				return
			}
			b := make([]byte, size)
			n, _ := readFull(in, b)
			_, _ = in.Write(b[:n])
			_ = in.Close()
		}
	}), nil)
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			sess, err := newTestClient(t, ca, "edge-1", srv.addr(tr)).Dial(ctx)
			require.NoError(t, err)
			defer sess.Close("test done")

			in, err := sess.AcceptStream(ctx)
			require.NoError(t, err)
			b := make([]byte, size+1)
			n, err := readFull(in, b)
			require.NoError(t, err)
			require.Equal(t, size, n, "server-opened stream carries all its bytes, then EOF")
			for i := range n {
				if b[i] != pattern(i) {
					t.Fatalf("byte %d differs", i)
				}
			}
			_ = in.Close()

			out, err := sess.OpenStream(ctx)
			require.NoError(t, err)
			data := make([]byte, size)
			for i := range data {
				data[i] = byte(i)
			}
			_, err = out.Write(data)
			require.NoError(t, err)
			back := make([]byte, size)
			n, err = readFull(out, back)
			require.NoError(t, err)
			require.Equal(t, size, n)
			require.Equal(t, data, back)
			_ = out.Close()
		})
	}
}

// readFull reads until b is full or the stream ends; EOF is not an error.
func readFull(r interface{ Read([]byte) (int, error) }, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := r.Read(b[n:])
		n += k
		if err != nil {
			if err.Error() == "EOF" {
				return n, nil
			}
			return n, err
		}
	}
	return n, nil
}

func TestFailoverAcrossServers(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	// A port with nothing behind it, on both UDP and TCP.
	dead := freeAddr(t)
	c, err := NewClient(ClientConfig{
		Options:     testOptions(),
		Servers:     []string{dead, srv.QUICAddr().String()},
		Node:        "edge-1",
		TLS:         ca.clientTLS(t, certOpts{cn: "edge-1"}),
		DialTimeout: 300 * time.Millisecond,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sess, err := c.Dial(ctx)
	require.NoError(t, err)
	require.Equal(t, TransportQUIC, sess.Transport())
	require.NoError(t, sess.Close("done"))
	require.GreaterOrEqual(t, testutil.ToFloat64(c.metrics.DialFailures.WithLabelValues("quic")), 1.0)
	require.GreaterOrEqual(t, testutil.ToFloat64(c.metrics.DialFailures.WithLabelValues("websocket")), 1.0)
}

// TestFallbackToWebSocket blocks UDP (the QUIC port has nothing behind it)
// and expects the client to land on WebSocket at the same address.
func TestFallbackToWebSocket(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.QUICAddr = "" })
	c, err := NewClient(ClientConfig{
		Options:     testOptions(),
		Servers:     []string{srv.WebSocketAddr().String()},
		Node:        "edge-1",
		TLS:         ca.clientTLS(t, certOpts{cn: "edge-1"}),
		DialTimeout: 500 * time.Millisecond,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sess, err := c.Dial(ctx)
	require.NoError(t, err)
	require.Equal(t, TransportWebSocket, sess.Transport())
	require.NoError(t, sess.Close("done"))
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	return addr
}

// TestRunReconnects checks that Run dials again after the session drops
// and reaches a second server when the first one is gone.
func TestRunReconnects(t *testing.T) {
	ca := newTestCA(t)
	first := startServerCancelable(t, ca)
	second := startServer(t, ca, echo, nil)
	c, err := NewClient(ClientConfig{
		Options:     testOptions(),
		Servers:     []string{"quic://" + first.srv.QUICAddr().String(), "quic://" + second.QUICAddr().String()},
		Node:        "edge-1",
		TLS:         ca.clientTLS(t, certOpts{cn: "edge-1"}),
		DialTimeout: 300 * time.Millisecond,
		Backoff:     Backoff{Min: 10 * time.Millisecond, Max: 50 * time.Millisecond},
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	sessions := make(chan string, 10)
	done := make(chan error, 1)
	go func() {
		done <- c.Run(ctx, func(ctx context.Context, s *Session) error {
			sessions <- s.ID()
			<-s.Done()
			return nil
		})
	}()
	first1 := <-sessions
	first.stop() // the first cloud goes away
	var second1 string
	select {
	case second1 = <-sessions:
	case <-time.After(10 * time.Second):
		t.Fatal("client did not reconnect")
	}
	require.NotEqual(t, first1, second1)
	cancel()
	require.NoError(t, <-done)
}

type stoppable struct {
	srv  *Server
	stop func()
}

func startServerCancelable(t *testing.T, ca *testCA) *stoppable {
	cfg := ServerConfig{Options: testOptions(), QUICAddr: "127.0.0.1:0", TLS: ca.serverTLS(t), Handler: echo}
	srv, err := NewServer(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			require.NoError(t, <-done)
		}
	}
	t.Cleanup(stop)
	return &stoppable{srv: srv, stop: stop}
}

// TestSendIsBoundedBySlowPeer: a peer that never reads makes Send wait
// for queue space, and Send honours its context instead of growing memory.
// The bytes Send accepted but the writer has not handed to the transport
// are exactly the send queue: at most SendQueueBytes, and within one frame
// of it (so it is the byte bound, not the frame channel or anything else,
// that stopped Send). The heap grows by no more than the queue, plus on
// QUIC the written bytes quic-go buffers at both ends, plus 1 MiB.
func TestSendIsBoundedBySlowPeer(t *testing.T) {
	const queueBytes = 1 << 20 // under the 128 frames the channel holds
	ca := newTestCA(t)
	srv := startServer(t, ca, HandlerFunc(func(ctx context.Context, s *Session) { <-ctx.Done() }),
		func(c *ServerConfig) { c.RecvQueue = 4 })
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			c, err := NewClient(ClientConfig{
				Options: func() Options {
					o := testOptions()
					o.SendQueueBytes = queueBytes
					o.MaxFrame = 64 << 10
					return o
				}(),
				Servers: []string{srv.addr(tr)},
				Node:    "edge-1",
				TLS:     ca.clientTLS(t, certOpts{cn: "edge-1"}),
			})
			require.NoError(t, err)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			sess, err := c.Dial(ctx)
			require.NoError(t, err)
			defer sess.Close("test done")
			m := &message.Message{Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, 16<<10)}
			frame, err := message.NewCodec(0).AppendFrame(nil, m)
			require.NoError(t, err)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			var accepted int
			for {
				sctx, scancel := context.WithTimeout(ctx, 300*time.Millisecond)
				err := sess.Send(sctx, m)
				scancel()
				if err != nil {
					require.ErrorIs(t, err, context.DeadlineExceeded)
					break
				}
				accepted += len(frame)
				require.Less(t, accepted, 256<<20, "Send never blocked: the queue is not bounded")
			}
			written := int(bytesOut(c.Metrics()))
			runtime.GC()
			runtime.ReadMemStats(&after)
			grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
			queued := accepted - written
			t.Logf("%s: %d KiB accepted, %d KiB written to the transport, %d KiB queued; heap grew %d KiB",
				tr, accepted>>10, written>>10, queued>>10, grown>>10)
			require.LessOrEqual(t, queued, queueBytes, "more queued than SendQueueBytes")
			require.Greater(t, queued, queueBytes-len(frame), "Send blocked before the queue was full")
			held := 0 // WebSocket's written bytes wait in the kernel's socket buffers
			if tr == TransportQUIC {
				held = 2 * written
			}
			require.Less(t, grown, int64(queueBytes+held+1<<20), "the heap grew beyond the queue")
		})
	}
}

func TestSessionEndsWhenServerStops(t *testing.T) {
	ca := newTestCA(t)
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			cfg := ServerConfig{Options: testOptions(), WebSocketAddr: "127.0.0.1:0", QUICAddr: "127.0.0.1:0", TLS: ca.serverTLS(t), Handler: echo}
			s2, err := NewServer(cfg)
			require.NoError(t, err)
			require.NoError(t, s2.Listen())
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- s2.Run(ctx) }()
			addr := "quic://" + s2.QUICAddr().String()
			if tr == TransportWebSocket {
				addr = "wss://" + s2.WebSocketAddr().String()
			}
			sess, err := newTestClient(t, ca, "edge-1", addr).Dial(context.Background())
			require.NoError(t, err)
			cancel()
			require.NoError(t, <-done)
			select {
			case <-sess.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("client session did not notice the server stopping")
			}
			_, err = sess.Recv(context.Background())
			require.ErrorIs(t, err, ErrSessionClosed)
			require.Error(t, sess.Send(context.Background(), &message.Message{Kind: message.KindAck}))
		})
	}
}

func TestOptionsValidation(t *testing.T) {
	_, err := NewServer(ServerConfig{})
	require.Error(t, err)
	_, err = NewClient(ClientConfig{Servers: []string{"ftp://x:1"}, Node: "n", TLS: nil})
	require.Error(t, err)
	_, err = Options{KeepAlive: time.Second, DeadPeerTimeout: time.Second}.withDefaults()
	require.Error(t, err)
	_, err = Options{MaxFrame: 1 << 20, SendQueueBytes: 1024}.withDefaults()
	require.Error(t, err)
	o, err := Options{}.withDefaults()
	require.NoError(t, err)
	require.Equal(t, 15*time.Second, o.DeadPeerTimeout)
	require.Equal(t, message.DefaultMaxFrame, o.MaxFrame)
	require.Equal(t, 60*time.Second, o.LargeMessageTimeout)
	require.NotNil(t, o.Logger, "a nil logger means a discard logger")
	require.NotSame(t, slog.Default(), o.Logger)
	require.False(t, o.Logger.Enabled(context.Background(), slog.LevelError), "a nil logger discards")
}

// TestMetricsRegistrationErrorsAreReturned: a registerer that already
// holds the tunnel's metrics makes the constructors fail, not panic.
func TestMetricsRegistrationErrorsAreReturned(t *testing.T) {
	ca := newTestCA(t)
	reg := prometheus.NewRegistry()
	opts := testOptions()
	opts.Registerer = reg
	cfg := ClientConfig{Options: opts, Servers: []string{"127.0.0.1:1"}, Node: "edge-1", TLS: ca.clientTLS(t, certOpts{cn: "edge-1"})}
	_, err := NewClient(cfg)
	require.NoError(t, err)
	_, err = NewClient(cfg)
	require.ErrorContains(t, err, "register tunnel metrics")
	scfg := ServerConfig{Options: opts, QUICAddr: "127.0.0.1:0", TLS: ca.serverTLS(t), Handler: echo}
	_, err = NewServer(scfg)
	require.NoError(t, err, "server and client metrics differ by their side label")
	_, err = NewServer(scfg)
	require.ErrorContains(t, err, "register tunnel metrics")
}

// TestSendOverFrameLimitKeepsSession: Send of a message over the frame
// limit fails with ErrFrameTooLarge and the session goes on working.
func TestSendOverFrameLimitKeepsSession(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ctx, sess := dialTest(t, newTestClient(t, ca, "edge-1", srv.addr(tr)))
			err := sess.Send(ctx, &message.Message{ID: 1, Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, message.DefaultMaxFrame)})
			require.ErrorIs(t, err, message.ErrFrameTooLarge)
			requireRoundTrip(ctx, t, sess, 2)
		})
	}
}

// TestPeerWithSmallerFrameLimit: the sender allows 8 MiB frames, the
// receiver 4 MiB. On QUIC the oversize message travels on its own stream:
// the receiver resets that stream, counts it, and the sender's Send fails
// with ErrFrameTooLarge while the session goes on. On WebSocket there is
// one ordered byte stream, and the receiver closes the session as for any
// bad frame rather than reading and discarding megabytes it refused.
func TestPeerWithSmallerFrameLimit(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	opts := testOptions()
	opts.MaxFrame = 8 << 20
	opts.SendQueueBytes = 16 << 20
	big := &message.Message{ID: 1, Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, 5<<20)}
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ctx, sess := dialTest(t, newOptionsClient(t, ca, opts, srv.addr(tr)))
			if tr == TransportQUIC {
				before := srv.refused(tr, reasonTooLarge)
				require.ErrorIs(t, sess.Send(ctx, big), message.ErrFrameTooLarge)
				require.Equal(t, before+1, srv.refused(tr, reasonTooLarge))
				requireRoundTrip(ctx, t, sess, 2)
				return
			}
			before := srv.refused(tr, reasonFrame)
			_ = sess.Send(ctx, big) // queued: the refusal comes as the session's end
			select {
			case <-sess.Done():
			case <-ctx.Done():
				t.Fatal("the receiver kept a WebSocket session whose framing it refused")
			}
			require.Eventually(t, func() bool { return srv.refused(tr, reasonFrame) > before }, 5*time.Second, 10*time.Millisecond)
		})
	}
}

// newOptionsClient returns a client for node edge-1 with opts.
func newOptionsClient(t *testing.T, ca *testCA, opts Options, server string) *Client {
	t.Helper()
	c, err := NewClient(ClientConfig{Options: opts, Servers: []string{server}, Node: "edge-1", TLS: ca.clientTLS(t, certOpts{cn: "edge-1"})})
	require.NoError(t, err)
	return c
}

// dialTest dials c and returns the session with a context that ends with
// the test (or after 30 s); the session is closed when the test ends.
func dialTest(t *testing.T, c *Client) (context.Context, *Session) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	sess, err := c.Dial(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sess.Close("test done") })
	return ctx, sess
}

// requireRoundTrip sends an event and waits for the echo's ack of it.
func requireRoundTrip(ctx context.Context, t *testing.T, sess *Session, id uint64) {
	t.Helper()
	require.NoError(t, sess.Send(ctx, &message.Message{ID: id, Kind: message.KindEvent, Op: message.OpUpsert, Payload: []byte("after")}))
	for {
		m, err := sess.Recv(ctx)
		require.NoError(t, err, "the session must survive")
		if m.ReplyTo == id {
			return
		}
	}
}

// TestWebSocketBatchesStayWithinPeerLimits: the writer joins queued
// frames into one WebSocket message. Frames near the limit mixed with
// small ones, and a limit below the batch size, must never make a message
// the receiver refuses: every message is acked and the session stays up.
func TestWebSocketBatchesStayWithinPeerLimits(t *testing.T) {
	for _, maxFrame := range []int{64 << 10, 16 << 10} {
		t.Run(strconv.Itoa(maxFrame>>10)+"KiB", func(t *testing.T) {
			ca := newTestCA(t)
			srv := startServer(t, ca, echo, func(c *ServerConfig) { c.MaxFrame = maxFrame })
			opts := testOptions()
			opts.MaxFrame = maxFrame
			ctx, sess := dialTest(t, newOptionsClient(t, ca, opts, srv.addr(TransportWebSocket)))
			const n = 400
			acked := make(chan error, 1)
			go func() {
				for got := 0; got < n; got++ {
					if _, err := sess.Recv(ctx); err != nil {
						acked <- err
						return
					}
				}
				acked <- nil
			}()
			for i := range n {
				size := 1 << 10
				if i%2 == 1 {
					size = maxFrame - 200 // with the envelope, just under the limit
				}
				require.NoError(t, sess.Send(ctx, &message.Message{ID: uint64(i + 1), Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, size)}))
			}
			require.NoError(t, <-acked, "every message is acked on a session that stays up")
			require.NoError(t, sess.Err())
		})
	}
}

// TestLateLargeMessageFailsOnlyItsSend: a receiver whose large-message
// deadline is shorter than a 4 MiB transfer resets the stream; the
// sender's Send says why and the session goes on.
func TestLateLargeMessageFailsOnlyItsSend(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.LargeMessageTimeout = time.Millisecond })
	ctx, sess := dialTest(t, newTestClient(t, ca, "edge-1", srv.addr(TransportQUIC)))
	before := srv.refused(TransportQUIC, reasonLargeTimeout)
	err := sess.Send(ctx, &message.Message{ID: 1, Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, 4<<20-1024)})
	require.ErrorIs(t, err, ErrLargeMessageTimeout)
	require.NotErrorIs(t, err, ErrSessionClosed)
	require.Equal(t, before+1, srv.refused(TransportQUIC, reasonLargeTimeout))
	requireRoundTrip(ctx, t, sess, 2)
}

// TestReadyAndTryRecv: a loop that selects on Ready and polls TryRecv
// gets every message in order, then learns of the session's end.
func TestReadyAndTryRecv(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sess, err := newTestClient(t, ca, "edge-1", srv.addr(tr)).Dial(ctx)
			require.NoError(t, err)
			m, err := sess.TryRecv()
			require.NoError(t, err)
			require.Nil(t, m, "nothing has arrived")
			const n = 20
			for i := range n {
				require.NoError(t, sess.Send(ctx, &message.Message{ID: uint64(i + 1), Kind: message.KindEvent, Op: message.OpUpsert}))
			}
			var got []uint64
			for len(got) < n {
				select {
				case <-sess.Ready():
				case <-ctx.Done():
					t.Fatalf("%d of %d answers", len(got), n)
				}
				for {
					m, err := sess.TryRecv()
					require.NoError(t, err)
					if m == nil {
						break
					}
					got = append(got, m.ReplyTo)
				}
			}
			for i, id := range got {
				require.Equal(t, uint64(i+1), id, "in order")
			}
			select { // a wake-up left from the messages: the end must send its own
			case <-sess.Ready():
			default:
			}
			sess.Abort("test done")
			for {
				select {
				case <-sess.Ready():
				case <-ctx.Done():
					t.Fatal("Ready never told of the end")
				}
				m, err := sess.TryRecv()
				require.Nil(t, m)
				if err != nil {
					require.ErrorIs(t, err, ErrSessionClosed)
					break
				}
			}
			<-sess.Done()
		})
	}
}

// TestWebSocketLargeFrameSlowerThanDeadPeer: a frame that takes longer
// than DeadPeerTimeout to arrive, over a slow path where bytes never stop
// for long, is delivered: the dead-peer deadline measures silence, not a
// frame's transfer time. It was set once per frame, so a frame of 512 KiB
// arriving at 160 KiB/s (3.2 s) ended the session at 1 s ("read frame: i/o
// timeout").
func TestWebSocketLargeFrameSlowerThanDeadPeer(t *testing.T) {
	ca := newTestCA(t)
	opts := testOptions()
	opts.KeepAlive, opts.DeadPeerTimeout = 200*time.Millisecond, time.Second
	srv := startServer(t, ca, echo, func(c *ServerConfig) { o := opts; o.Registerer = c.Registerer; c.Options = o })
	p := netproxy.Start(t, srv.WebSocketAddr().String(), netproxy.Options{Network: "tcp", StallTime: 100 * time.Millisecond})
	c, err := NewClient(ClientConfig{Options: opts, Servers: []string{"wss://" + p.Addr().String()}, Node: "edge-1", TLS: ca.clientTLS(t, certOpts{cn: "edge-1"})})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sess, err := c.Dial(ctx)
	require.NoError(t, err)
	defer sess.Close("test done")
	// Every 16 KiB chunk now waits 100 ms in each direction: 160 KiB/s,
	// and the path is never silent for more than about 100 ms.
	p.SetLoss(1)
	start := time.Now()
	require.NoError(t, sess.Send(ctx, &message.Message{ID: 1, Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, 512<<10)}))
	m, err := sess.Recv(ctx)
	require.NoError(t, err, "after %s", time.Since(start))
	require.Equal(t, uint64(1), m.ReplyTo)
	require.Len(t, m.Payload, 512<<10)
	t.Logf("512 KiB each way in %s (dead peer timeout %s)", time.Since(start), opts.DeadPeerTimeout)
}
