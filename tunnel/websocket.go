package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"github.com/tetheredge/tether/common/message"
)

// WebSocket endpoints on the server.
const (
	wsSessionPath = "/tether/v1/session"
	wsStreamPath  = "/tether/v1/stream"
)

// wsLink runs a session over one WebSocket connection. Each binary
// WebSocket message holds one or more complete length-prefixed frames, at
// most MaxFrame+4 bytes in all (see Session.writeLoop), and the reader
// refuses a longer message.
// Keepalive is WebSocket ping/pong, which gorilla interleaves with the
// frames of a long message, so a large message does not starve it. Bulk
// streams are separate WebSocket connections (see wsStreams).
type wsLink struct {
	conn      *websocket.Conn
	codec     *message.Codec
	keepAlive time.Duration
	deadPeer  time.Duration
	streams   wsStreams

	pending *bytes.Reader // frames left from the last message read by readFrame

	// ctx and g are the session's, set by run before any frame is delivered.
	ctx context.Context
	g   spawner
}

// handleControl takes the messages that belong to the link rather than to
// the session's user: stream requests.
func (l *wsLink) handleControl(m *message.Message) error {
	return l.streams.control(l.ctx, l.g, m)
}

// wsStreams opens and accepts bulk streams for a WebSocket session. The
// client dials a new connection for each stream; the server asks the client
// to dial when it opens one.
type wsStreams interface {
	open(ctx context.Context) (Stream, error)
	accept(ctx context.Context) (Stream, error)
	// control handles a KindStreamOpen message from the peer.
	control(ctx context.Context, g spawner, m *message.Message) error
}

func newWSLink(conn *websocket.Conn, c *message.Codec, keepAlive, deadPeer time.Duration, st wsStreams) *wsLink {
	conn.SetReadLimit(int64(c.MaxFrame()) + frameHeaderLen)
	return &wsLink{conn: conn, codec: c, keepAlive: keepAlive, deadPeer: deadPeer, streams: st}
}

func (l *wsLink) writeFrames(batch []byte) error {
	return l.conn.WriteMessage(websocket.BinaryMessage, batch)
}

func (l *wsLink) setDeadline(t time.Time) error {
	if err := l.conn.SetReadDeadline(t); err != nil {
		return err
	}
	return l.conn.SetWriteDeadline(t)
}

// interrupt moves the deadlines of the connection under gorilla's, which
// unlike gorilla's own setters may be done while it reads or writes.
func (l *wsLink) interrupt() { _ = l.conn.NetConn().SetDeadline(time.Now()) }

// readFrame returns the next frame, reading a new WebSocket message when
// the last one is used up. Only the handshake uses it.
func (l *wsLink) readFrame() ([]byte, error) {
	for l.pending == nil || l.pending.Len() == 0 {
		typ, data, err := l.conn.ReadMessage()
		if err != nil {
			return nil, err
		}
		if typ != websocket.BinaryMessage {
			return nil, fmt.Errorf("%w: websocket message of type %d, want binary", message.ErrMalformed, typ)
		}
		l.pending = bytes.NewReader(data)
	}
	body, err := l.codec.ReadFrame(l.pending)
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return body, err
}

func (l *wsLink) writeLarge(context.Context, []byte) (bool, error) { return false, nil }

func (l *wsLink) run(ctx context.Context, g spawner, sink linkSink) error {
	alive := func() { _ = l.conn.SetReadDeadline(time.Now().Add(l.deadPeer)) }
	alive()
	l.conn.SetPongHandler(func(string) error { alive(); return nil })
	l.conn.SetPingHandler(func(data string) error {
		alive()
		// A pong that cannot be written now (our own writes are stuck behind
		// a slow peer) is dropped: the peer's own reads decide its liveness.
		_ = l.conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(l.keepAlive))
		return nil
	})
	defer l.startPings()()
	l.ctx, l.g = ctx, g
	if l.pending != nil {
		for l.pending.Len() > 0 {
			body, err := l.codec.ReadFrame(l.pending)
			if err != nil {
				return fmt.Errorf("read frame: %w", err)
			}
			if err := sink.deliver(body); err != nil {
				return err
			}
		}
		l.pending = nil
	}
	for {
		alive()
		typ, r, err := l.conn.NextReader()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				if ce.Code == websocket.CloseNormalClosure {
					return fmt.Errorf("%w: %s", errPeerClosed, ce.Text)
				}
				return fmt.Errorf("peer closed the connection: %d %s", ce.Code, ce.Text)
			}
			return fmt.Errorf("read websocket: %w", err)
		}
		if typ != websocket.BinaryMessage {
			return fmt.Errorf("%w: websocket message of type %d, want binary", message.ErrMalformed, typ)
		}
		// The deadline measures silence from the peer, not the time a
		// frame takes to arrive (a frame of MaxFrame over a slow link
		// takes longer than DeadPeerTimeout) nor the time this side spent
		// delivering: every read that brings bytes restarts it.
		r = aliveReader{r, alive}
		for {
			alive()
			body, err := l.codec.ReadFrame(r)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return fmt.Errorf("read frame: %w", err)
			}
			if err := sink.deliver(body); err != nil {
				return err
			}
		}
	}
}

// aliveReader calls alive after each read that brought bytes.
type aliveReader struct {
	r     io.Reader
	alive func()
}

func (a aliveReader) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if n > 0 {
		a.alive()
	}
	return n, err
}

// startPings pings the peer every keepAlive from a timer, so that an idle
// session holds no goroutine for it, and returns a function that stops
// the pings and waits for one in progress. A ping that fails for another
// reason than its deadline stops them: the reader sees the broken
// connection and reports it.
func (l *wsLink) startPings() (stop func()) {
	var (
		mu       sync.Mutex
		stopped  bool
		t        *time.Timer
		inFlight sync.WaitGroup
	)
	ping := func() {
		mu.Lock()
		if stopped {
			mu.Unlock()
			return
		}
		inFlight.Add(1)
		mu.Unlock()
		defer inFlight.Done()
		err := l.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(l.deadPeer/2))
		var ne net.Error
		if err != nil && (!errors.As(err, &ne) || !ne.Timeout()) {
			return
		}
		mu.Lock()
		if !stopped {
			t.Reset(l.keepAlive)
		}
		mu.Unlock()
	}
	mu.Lock()
	t = time.AfterFunc(l.keepAlive, ping)
	mu.Unlock()
	return func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
		inFlight.Wait()
	}
}

func (l *wsLink) openStream(ctx context.Context) (Stream, error) { return l.streams.open(ctx) }

func (l *wsLink) acceptStream(ctx context.Context) (Stream, error) { return l.streams.accept(ctx) }

func (l *wsLink) close(reason string) error {
	const maxReason = 120 // a close frame's reason is at most 123 bytes
	if len(reason) > maxReason {
		reason = reason[:maxReason]
	}
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, reason)
	_ = l.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second)) // best effort
	return l.conn.Close()
}

// wsStream is a bulk stream over its own WebSocket connection: each Write
// is one binary message, reads run across message boundaries.
type wsStream struct {
	conn    *websocket.Conn
	r       io.Reader
	wmu     sync.Mutex
	closeMu sync.Once
}

func (s *wsStream) Read(p []byte) (int, error) {
	for {
		if s.r == nil {
			typ, r, err := s.conn.NextReader()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) && ce.Code == websocket.CloseNormalClosure {
					return 0, io.EOF
				}
				return 0, err
			}
			if typ != websocket.BinaryMessage {
				return 0, fmt.Errorf("stream: websocket message of type %d, want binary", typ)
			}
			s.r = r
		}
		n, err := s.r.Read(p)
		if errors.Is(err, io.EOF) {
			s.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (s *wsStream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.conn.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close tells the peer it has everything (it reads EOF) and closes.
func (s *wsStream) Close() error {
	var err error
	s.closeMu.Do(func() {
		_ = s.conn.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
		err = s.conn.Close()
	})
	return err
}
