package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"net/url"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/tests/netproxy"
)

// requireServes checks that a well-behaved client still gets a working
// session on every transport.
func requireServes(t *testing.T, srv *testServer) {
	t.Helper()
	for _, tr := range transports {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		sess, err := newTestClient(t, srv.ca, "edge-good", srv.addr(tr)).Dial(ctx)
		require.NoError(t, err, "good client on %s after bad input", tr)
		require.NoError(t, sess.Send(ctx, &message.Message{ID: 1, Kind: message.KindEvent, Op: message.OpUpsert}))
		m, err := sess.Recv(ctx)
		require.NoError(t, err)
		require.Equal(t, uint64(1), m.ReplyTo)
		require.NoError(t, sess.Close("done"))
		cancel()
	}
}

func TestRefusesBadCertificates(t *testing.T) {
	ca := newTestCA(t)
	other := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) {
		c.Authorize = func(id Identity) error {
			if id.Node == "edge-banned" {
				return errors.New("node is disabled")
			}
			return nil
		}
	})
	tests := []struct {
		name   string
		tls    *tls.Config
		reason string
	}{
		{"no client certificate", &tls.Config{RootCAs: ca.pool}, reasonCertificate},
		{"certificate from another CA", withRoots(other.clientTLS(t, certOpts{cn: "edge-1"}), ca), reasonCertificate},
		{"expired certificate", ca.clientTLS(t, certOpts{cn: "edge-1", notBefore: time.Now().Add(-48 * time.Hour), notAfter: time.Now().Add(-time.Hour)}), reasonCertificate},
		{"not yet valid certificate", ca.clientTLS(t, certOpts{cn: "edge-1", notBefore: time.Now().Add(time.Hour), notAfter: time.Now().Add(2 * time.Hour)}), reasonCertificate},
		{"self-signed certificate", ca.clientTLS(t, certOpts{cn: "edge-1", selfSign: true}), reasonCertificate},
		{"server-usage certificate", ca.clientTLS(t, certOpts{cn: "edge-1", server: true}), reasonCertificate},
		{"empty common name", ca.clientTLS(t, certOpts{cn: ""}), reasonCertificate},
		{"refused by the authorize hook", ca.clientTLS(t, certOpts{cn: "edge-banned"}), reasonAuthorize},
	}
	for _, tt := range tests {
		for _, tr := range transports {
			t.Run(tt.name+"/"+string(tr), func(t *testing.T) {
				before := srv.refused(tr, tt.reason)
				c, err := NewClient(ClientConfig{Options: testOptions(), Servers: []string{srv.addr(tr)}, Node: "edge-1", TLS: tt.tls, DialTimeout: 2 * time.Second})
				require.NoError(t, err)
				_, err = c.Dial(context.Background())
				require.Error(t, err)
				require.Eventually(t, func() bool { return srv.refused(tr, tt.reason) > before }, 5*time.Second, 10*time.Millisecond,
					"refusal counted under %q", tt.reason)
			})
		}
	}
	requireServes(t, srv)
}

func withRoots(c *tls.Config, ca *testCA) *tls.Config {
	c.RootCAs = ca.pool
	return c
}

func TestRefusesHelloForAnotherNode(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			c, err := NewClient(ClientConfig{Options: testOptions(), Servers: []string{srv.addr(tr)}, Node: "edge-2",
				TLS: ca.clientTLS(t, certOpts{cn: "edge-1"})})
			require.NoError(t, err)
			_, err = c.Dial(context.Background())
			var refused *RefusedError
			require.ErrorAs(t, err, &refused)
			require.Contains(t, refused.Reason, `claims node "edge-2"`)
			require.Eventually(t, func() bool { return srv.refused(tr, reasonNodeName) == 1 }, 5*time.Second, 10*time.Millisecond)
		})
	}
	requireServes(t, srv)
}

// rawQUIC opens an authenticated QUIC connection and control stream
// without the hello, so a test can write whatever bytes it likes.
func rawQUIC(t *testing.T, srv *testServer, node string) (*quic.Conn, *quic.Stream) {
	t.Helper()
	c := newTestClient(t, srv.ca, node, srv.addr(TransportQUIC))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addr := srv.QUICAddr().String()
	conn, err := quic.DialAddr(ctx, addr, c.tlsConfig(TransportQUIC, addr), quicConfig(Options{KeepAlive: time.Second, DeadPeerTimeout: 5 * time.Second}, 5*time.Second))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.CloseWithError(0, "") })
	st, err := conn.OpenStreamSync(ctx)
	require.NoError(t, err)
	return conn, st
}

// rawWS opens an authenticated WebSocket session connection without hello.
func rawWS(t *testing.T, srv *testServer, node string) *websocket.Conn {
	t.Helper()
	c := newTestClient(t, srv.ca, node, srv.addr(TransportWebSocket))
	addr := srv.WebSocketAddr().String()
	d := websocket.Dialer{TLSClientConfig: c.tlsConfig(TransportWebSocket, addr), HandshakeTimeout: 5 * time.Second}
	u := url.URL{Scheme: "wss", Host: addr, Path: wsSessionPath}
	conn, resp, err := d.Dial(u.String(), nil)
	require.NoError(t, err)
	_ = resp.Body.Close()
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func helloFrame(t *testing.T, version uint16, node string) []byte {
	c := message.NewCodec(0)
	p, err := c.Append(nil, &message.Hello{Version: version, Node: node})
	require.NoError(t, err)
	f, err := c.AppendFrame(nil, &message.Message{Kind: message.KindHello, Payload: p})
	require.NoError(t, err)
	return f
}

func lengthPrefix(n uint32) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, n)
	return b
}

// TestRefusesBadFrames writes hostile bytes where the server expects the
// hello or, after a good hello, envelopes. Each must end that connection
// with a counted reason and leave the server serving others.
func TestRefusesBadFrames(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	hello := helloFrame(t, message.ProtocolVersion, "edge-1")
	tests := []struct {
		name      string
		afterOK   bool   // send a good hello first
		bytes     []byte // written on the control path
		reason    string
		wantReply string // substring of the refusal sent back, if any
	}{
		{"unknown protocol version", false, helloFrame(t, 99, "edge-1"), reasonVersion, "unsupported protocol version 99"},
		{"garbage instead of hello", false, append(lengthPrefix(5), 0xc1, 0xc1, 0xc1, 0xc1, 0xc1), reasonHello, "decode hello"},
		{"oversized hello length", false, lengthPrefix(0xffffffff), reasonHello, ""},
		{"event instead of hello", false, mustFrame(t, &message.Message{Kind: message.KindEvent, Op: message.OpUpsert}), reasonHello, "want hello"},
		{"oversized frame after hello", true, lengthPrefix(message.DefaultMaxFrame + 1), reasonFrame, ""},
		{"garbage frame after hello", true, append(lengthPrefix(3), 0x93, 0xc1, 0xc1), reasonFrame, ""},
		{"unknown kind after hello", true, mustFrame(t, &message.Message{Kind: 77}), reasonFrame, ""},
		{"zero-length frame after hello", true, lengthPrefix(0), reasonFrame, ""},
	}
	for _, tt := range tests {
		t.Run("quic/"+tt.name, func(t *testing.T) {
			before := srv.refused(TransportQUIC, tt.reason)
			conn, st := rawQUIC(t, srv, "edge-1")
			if tt.afterOK {
				_, err := st.Write(hello)
				require.NoError(t, err)
				_, err = message.NewCodec(0).ReadFrame(st) // hello ack
				require.NoError(t, err)
			}
			_, err := st.Write(tt.bytes)
			require.NoError(t, err)
			select {
			case <-conn.Context().Done():
			case <-time.After(10 * time.Second):
				t.Fatal("server did not close the connection")
			}
			var appErr *quic.ApplicationError
			require.ErrorAs(t, context.Cause(conn.Context()), &appErr)
			require.Contains(t, appErr.ErrorMessage, tt.wantReply)
			require.Eventually(t, func() bool { return srv.refused(TransportQUIC, tt.reason) > before }, 5*time.Second, 10*time.Millisecond)
		})
		t.Run("websocket/"+tt.name, func(t *testing.T) {
			before := srv.refused(TransportWebSocket, tt.reason)
			conn := rawWS(t, srv, "edge-1")
			if tt.afterOK {
				require.NoError(t, conn.WriteMessage(websocket.BinaryMessage, hello))
				_, _, err := conn.ReadMessage()
				require.NoError(t, err)
			}
			require.NoError(t, conn.WriteMessage(websocket.BinaryMessage, tt.bytes))
			var got []byte
			_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			var err error
			for err == nil {
				var data []byte
				_, data, err = conn.ReadMessage()
				got = append(got, data...)
			}
			var ce *websocket.CloseError
			if tt.wantReply != "" {
				require.True(t, bytes.Contains(got, []byte(tt.wantReply)) || (errors.As(err, &ce) && bytes.Contains([]byte(ce.Text), []byte(tt.wantReply))),
					"reply %q / close %v should say %q", got, err, tt.wantReply)
			}
			require.False(t, isTimeout(err), "server did not close the connection: %v", err)
			require.Eventually(t, func() bool { return srv.refused(TransportWebSocket, tt.reason) > before }, 5*time.Second, 10*time.Millisecond)
		})
	}
	t.Run("websocket/text message after hello", func(t *testing.T) {
		conn := rawWS(t, srv, "edge-1")
		require.NoError(t, conn.WriteMessage(websocket.BinaryMessage, hello))
		_, _, err := conn.ReadMessage()
		require.NoError(t, err)
		require.NoError(t, conn.WriteMessage(websocket.TextMessage, []byte("hi")))
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		for err == nil {
			_, _, err = conn.ReadMessage()
		}
		require.False(t, isTimeout(err))
	})
	requireServes(t, srv)
}

func mustFrame(t *testing.T, m *message.Message) []byte {
	f, err := message.NewCodec(0).AppendFrame(nil, m)
	require.NoError(t, err)
	return f
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestHelloTimeout: a client that connects and says nothing is dropped
// after the handshake timeout.
func TestHelloTimeout(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.HandshakeTimeout = 300 * time.Millisecond })
	conn, st := rawQUIC(t, srv, "edge-1")
	_ = st // opened but nothing written: the server never sees the stream
	select {
	case <-conn.Context().Done():
	case <-time.After(10 * time.Second):
		t.Fatal("silent QUIC client was not dropped")
	}
	require.GreaterOrEqual(t, srv.refused(TransportQUIC, reasonTimeout), 1.0)

	ws := rawWS(t, srv, "edge-1")
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _, err := ws.ReadMessage()
	require.Error(t, err)
	require.False(t, isTimeout(err), "silent WebSocket client was not dropped")
	require.GreaterOrEqual(t, srv.refused(TransportWebSocket, reasonTimeout), 1.0)
	requireServes(t, srv)
}

// TestRefusesNonTLSAndGarbage: plain TCP, plain HTTP and random datagrams.
func TestRefusesNonTLSAndGarbage(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	inputs := [][]byte{
		[]byte("GET /tether/v1/session HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"),
		{0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0},
		bytes.Repeat([]byte{0xde, 0xad}, 4096),
	}
	for i, in := range inputs {
		before := srv.refused(TransportWebSocket, reasonTLS)
		c, err := net.Dial("tcp", srv.WebSocketAddr().String())
		require.NoError(t, err)
		_, _ = c.Write(in)
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1024))
		for err == nil {
			_, err = c.Read(make([]byte, 1024))
		}
		require.False(t, isTimeout(err), "input %d: connection not closed", i)
		_ = c.Close()
		require.Eventually(t, func() bool { return srv.refused(TransportWebSocket, reasonTLS) > before }, 5*time.Second, 10*time.Millisecond)
	}
	// A TCP client that connects and never speaks is dropped too.
	c, err := net.Dial("tcp", srv.WebSocketAddr().String())
	require.NoError(t, err)
	_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
	_, err = c.Read(make([]byte, 1))
	require.False(t, isTimeout(err), "silent TCP client was not dropped")
	_ = c.Close()

	// Random datagrams at the QUIC port are dropped by quic-go before any
	// connection exists; the server keeps serving.
	u, err := net.Dial("udp", srv.QUICAddr().String())
	require.NoError(t, err)
	for i := range 200 {
		_, _ = u.Write(bytes.Repeat([]byte{byte(i)}, 1200))
	}
	_ = u.Close()
	requireServes(t, srv)
}

// TestDeadPeerDetected cuts the network between client and server right
// after a message went each way, so that each end last heard its peer at
// the cut. Both must declare the session dead within half a keepalive of
// DeadPeerTimeout after that: not before the timeout less one keepalive,
// and not later than three quarters of one after it (a quarter for the
// scheduling of a loaded machine). On QUIC the end that sent last (the
// server's echo) notices half a keepalive early and the other half a
// keepalive late (see quicIdleTimeout); with QUIC's idle timeout set to
// DeadPeerTimeout itself, the client noticed a whole keepalive late.
func TestDeadPeerDetected(t *testing.T) {
	opts := testOptions()
	opts.KeepAlive = 2 * time.Second
	opts.DeadPeerTimeout = 6 * time.Second
	earliest := opts.DeadPeerTimeout - opts.KeepAlive
	latest := opts.DeadPeerTimeout + opts.KeepAlive*3/4
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			t.Parallel()
			ca := newTestCA(t)
			serverSessions := make(chan *Session, 4)
			srv := startServer(t, ca, HandlerFunc(func(ctx context.Context, s *Session) {
				serverSessions <- s
				echo(ctx, s)
			}), func(c *ServerConfig) {
				c.Options.KeepAlive, c.Options.DeadPeerTimeout = opts.KeepAlive, opts.DeadPeerTimeout
			})
			var p *netproxy.Proxy
			addr := ""
			if tr == TransportQUIC {
				p = netproxy.Start(t, srv.QUICAddr().String(), netproxy.Options{Network: "udp"})
				addr = "quic://" + p.Addr().String()
			} else {
				p = netproxy.Start(t, srv.WebSocketAddr().String(), netproxy.Options{Network: "tcp"})
				addr = "wss://" + p.Addr().String()
			}
			c, err := NewClient(ClientConfig{Options: opts, Servers: []string{addr}, Node: "edge-1",
				TLS: ca.clientTLS(t, certOpts{cn: "edge-1"})})
			require.NoError(t, err)
			cs, err := c.Dial(context.Background())
			require.NoError(t, err)
			defer cs.Close("done")
			ss := <-serverSessions
			// Keepalive holds an idle session open well past the timeout.
			select {
			case <-ss.Done():
				t.Fatalf("an idle but healthy session must stay up: %v", ss.Err())
			case <-cs.Done():
				t.Fatalf("an idle but healthy session must stay up: %v", cs.Err())
			case <-time.After(opts.DeadPeerTimeout + opts.KeepAlive):
			}
			requireSessionEchoes(t, cs) // a message each way: each end has just heard its peer
			p.Partition(true)
			cut := time.Now()
			type end struct {
				side string
				d    time.Duration
			}
			ended := make(chan end, 2)
			for side, s := range map[string]*Session{"server": ss, "client": cs} {
				go func() {
					select {
					case <-s.Done():
						ended <- end{side, time.Since(cut)}
					case <-time.After(4 * opts.DeadPeerTimeout):
						ended <- end{side, -1}
					}
				}()
			}
			for range 2 {
				e := <-ended
				require.NotEqual(t, time.Duration(-1), e.d, "%s: dead peer not detected", e.side)
				t.Logf("%s %s: dead peer detected after %s (timeout %s, keepalive %s)", tr, e.side, e.d.Round(10*time.Millisecond), opts.DeadPeerTimeout, opts.KeepAlive)
				require.GreaterOrEqual(t, e.d, earliest, "%s: declared dead before the timeout", e.side)
				require.LessOrEqual(t, e.d, latest, "%s: dead peer detected too late", e.side)
			}
		})
	}
}

// rawSession opens an authenticated QUIC connection and completes the
// hello on its control stream.
func rawSession(t *testing.T, srv *testServer, node string) (*quic.Conn, *quic.Stream) {
	t.Helper()
	conn, st := rawQUIC(t, srv, node)
	_, err := st.Write(helloFrame(t, message.ProtocolVersion, node))
	require.NoError(t, err)
	_, err = message.NewCodec(0).ReadFrame(st) // hello ack
	require.NoError(t, err)
	return conn, st
}

// openAnnounced opens a large-message stream on a raw session and
// announces it on the control stream, as a peer that negotiated
// alpnQUICAnnounced does (rawQUIC offers it, the server prefers it).
func openAnnounced(t *testing.T, conn *quic.Conn, ctrl *quic.Stream) *quic.SendStream {
	t.Helper()
	require.Equal(t, alpnQUICAnnounced, conn.ConnectionState().TLS.NegotiatedProtocol)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	uni, err := conn.OpenUniStreamSync(ctx)
	require.NoError(t, err)
	_, err = ctrl.Write(mustFrame(t, &message.Message{Kind: message.KindStreamOpen}))
	require.NoError(t, err)
	return uni
}

// requireEchoes checks that a raw session still works: an event sent on
// the control stream is acked.
func requireEchoes(t *testing.T, st *quic.Stream, id uint64) {
	t.Helper()
	_, err := st.Write(mustFrame(t, &message.Message{ID: id, Kind: message.KindEvent, Op: message.OpUpsert}))
	require.NoError(t, err)
	c := message.NewCodec(0)
	require.NoError(t, st.SetReadDeadline(time.Now().Add(10*time.Second)))
	for {
		body, err := c.ReadFrame(st)
		require.NoError(t, err, "the session must survive")
		var m message.Message
		require.NoError(t, c.Unmarshal(body, &m))
		if m.ReplyTo == id {
			return
		}
	}
}

// requireReset waits until the peer resets uni and checks its code.
func requireReset(t *testing.T, uni *quic.SendStream, code quic.StreamErrorCode) {
	t.Helper()
	select {
	case <-uni.Context().Done():
	case <-time.After(10 * time.Second):
		t.Fatal("server did not reset the stream")
	}
	var serr *quic.StreamError
	require.ErrorAs(t, context.Cause(uni.Context()), &serr)
	require.Equal(t, code, serr.ErrorCode)
}

// TestLargeMessageStreamViolations: a uni stream carrying two frames ends
// the session as a counted bad frame (the peer's encoder is broken); one
// declaring more than the frame limit is reset with the too-large code and
// counted, and the session continues (the stream is self-contained, and a
// peer with a larger limit is misconfigured, not hostile).
func TestLargeMessageStreamViolations(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	t.Run("two frames", func(t *testing.T) {
		before := srv.refused(TransportQUIC, reasonFrame)
		conn, st := rawSession(t, srv, "edge-1")
		uni := openAnnounced(t, conn, st)
		_, err := uni.Write(append(mustFrame(t, &message.Message{Kind: message.KindAck}), mustFrame(t, &message.Message{Kind: message.KindAck})...))
		require.NoError(t, err)
		require.NoError(t, uni.Close())
		select {
		case <-conn.Context().Done():
		case <-time.After(10 * time.Second):
			t.Fatal("server did not close the connection")
		}
		require.Eventually(t, func() bool { return srv.refused(TransportQUIC, reasonFrame) > before }, 5*time.Second, 10*time.Millisecond)
	})
	t.Run("oversized", func(t *testing.T) {
		before := srv.refused(TransportQUIC, reasonTooLarge)
		conn, st := rawSession(t, srv, "edge-1")
		uni := openAnnounced(t, conn, st)
		_, err := uni.Write(lengthPrefix(message.DefaultMaxFrame + 1))
		require.NoError(t, err)
		requireReset(t, uni, quicStreamTooLarge)
		require.Equal(t, before+1, srv.refused(TransportQUIC, reasonTooLarge))
		requireEchoes(t, st, 7)
	})
}

// TestStalledLargeStreamsAreBoundedAndReset: a peer opens as many large
// streams as QUIC lets it, each declaring the largest frame, and sends
// nothing more. The server allocates as bytes arrive, so memory stays
// small (it used to allocate 16 x 4 MiB at once); each stream is reset
// with the timeout code after LargeMessageTimeout, not before; each reset
// is counted; and the session goes on working.
func TestStalledLargeStreamsAreBoundedAndReset(t *testing.T) {
	const timeout = time.Second
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.LargeMessageTimeout = timeout })
	conn, st := rawSession(t, srv, "edge-1")
	before := srv.refused(TransportQUIC, reasonLargeTimeout)
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	var streams []*quic.SendStream
	for range 16 {
		uni := openAnnounced(t, conn, st)
		_, err := uni.Write(lengthPrefix(message.DefaultMaxFrame))
		require.NoError(t, err)
		streams = append(streams, uni)
	}
	opened := time.Now()
	for _, uni := range streams {
		requireReset(t, uni, quicStreamTimeout)
	}
	elapsed := time.Since(opened)
	runtime.ReadMemStats(&m1)
	allocated := m1.TotalAlloc - m0.TotalAlloc
	t.Logf("16 stalled streams declaring %d MiB each: %d KiB allocated in the process until all were reset after %s",
		message.DefaultMaxFrame>>20, allocated>>10, elapsed.Round(time.Millisecond))
	require.GreaterOrEqual(t, elapsed, timeout, "streams reset before their deadline")
	require.Less(t, allocated, uint64(4<<20), "stalled streams must not pin their declared size")
	require.Equal(t, before+16, srv.refused(TransportQUIC, reasonLargeTimeout))
	requireEchoes(t, st, 8)

	// A complete frame whose stream never ends is late too, not a second
	// frame: reset, counted, session kept.
	uni := openAnnounced(t, conn, st)
	_, err := uni.Write(mustFrame(t, &message.Message{ID: 9, Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, 40<<10)}))
	require.NoError(t, err)
	requireReset(t, uni, quicStreamTimeout)
	require.Equal(t, before+17, srv.refused(TransportQUIC, reasonLargeTimeout))
	requireEchoes(t, st, 10)
}

// TestCancelledLargeSendKeepsSession: a large Send whose context ends
// mid-write drops that message only.
func TestCancelledLargeSendKeepsSession(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	ctx := context.Background()
	sess, err := newTestClient(t, ca, "edge-1", srv.addr(TransportQUIC)).Dial(ctx)
	require.NoError(t, err)
	defer sess.Close("done")
	for range 4 {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Millisecond)
		_ = sess.Send(sctx, &message.Message{ID: 1, Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, 4<<20-1024)})
		cancel()
	}
	require.NoError(t, sess.Send(ctx, &message.Message{ID: 99, Kind: message.KindEvent, Op: message.OpUpsert, Payload: []byte("after")}))
	for {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		m, err := sess.Recv(rctx)
		cancel()
		require.NoError(t, err, "the session survives cancelled large sends")
		if m.ReplyTo == 99 {
			break
		}
	}
	require.NoError(t, sess.Err())
}

// countingHandler counts warnings and errors by message.
type countingHandler struct {
	mu     sync.Mutex
	counts map[string]int
}

func (h *countingHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler           { return h }
func (h *countingHandler) WithGroup(string) slog.Handler                { return h }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.counts[r.Message]++
	return nil
}

func (h *countingHandler) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.counts[msg]
}

// TestBadInputLogsAreRateLimited: a peer repeating bad input is counted
// every time and logged once per cause and minute.
func TestBadInputLogsAreRateLimited(t *testing.T) {
	ca := newTestCA(t)
	logs := &countingHandler{counts: map[string]int{}}
	srv := startServer(t, ca, echo, func(c *ServerConfig) { c.Logger = slog.New(logs) })
	const n = 5
	for range n {
		conn, st := rawSession(t, srv, "edge-1")
		_, err := st.Write(append(lengthPrefix(3), 0x93, 0xc1, 0xc1))
		require.NoError(t, err)
		<-conn.Context().Done()
		c, err := NewClient(ClientConfig{Options: testOptions(), Servers: []string{srv.addr(TransportQUIC)}, Node: "edge-1", TLS: &tls.Config{RootCAs: ca.pool}})
		require.NoError(t, err)
		_, err = c.Dial(context.Background())
		require.Error(t, err)
	}
	require.Eventually(t, func() bool {
		return srv.refused(TransportQUIC, reasonFrame) == n && srv.refused(TransportQUIC, reasonCertificate) == n
	}, 5*time.Second, 10*time.Millisecond, "every refusal is counted")
	require.Equal(t, 1, logs.count("closing session"), "bad frames from one node are logged once")
	require.Equal(t, 1, logs.count("peer refused"), "certificate refusals are logged once")
}
