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
	control wsControl     // pings and pongs

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

func (l *wsLink) remoteAddr() net.Addr { return l.conn.RemoteAddr() }

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

func (l *wsLink) writeLarge(context.Context, []byte, func() error) (bool, error) {
	return false, nil
}

func (l *wsLink) run(ctx context.Context, g spawner, sink linkSink) error {
	alive := func() { _ = l.conn.SetReadDeadline(time.Now().Add(l.deadPeer)) }
	alive()
	l.control.start(l.conn, l.keepAlive)
	defer l.control.stop() // close waits for a write in progress
	l.conn.SetPongHandler(func(string) error { alive(); return nil })
	l.conn.SetPingHandler(func(data string) error {
		alive()
		l.control.owePong(data)
		return nil
	})
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

// wsControl writes a link's control frames from a timer: a ping every
// keepAlive, and a pong as soon as a ping asks for one (RFC 6455 allows
// answering only the latest). So an idle session holds no goroutine for
// them, and the reader never waits for a write: a pong written from the
// reader, stuck behind a peer that reads slowly, would stop the reading
// and with it the dead-peer deadline.
//
// The writes have no deadline, like the frames' own. A control frame cut
// off by a write deadline breaks the TLS connection under it for good:
// crypto/tls fails every later write, and the close_notify it sends on
// Close lands inside the cut-off record, so the peer reads "bad record
// MAC" instead of the session's end (a session whose peer was slow to
// read for a few keepalives failed so). A write held up by a slow peer
// waits as the frames' writes do; a dead peer is found by the reader's
// deadline, and close ends the write.
type wsControl struct {
	conn  *websocket.Conn
	every time.Duration

	mu       sync.Mutex
	t        *time.Timer
	running  bool   // a round of writes is in progress
	again    bool   // more to write was asked during it
	stopped  bool   // no more rounds
	pong     []byte // payload of the pong owed
	owed     bool
	nextPing time.Time
	rounds   sync.WaitGroup
}

// start schedules the first ping.
func (w *wsControl) start(conn *websocket.Conn, every time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.conn, w.every = conn, every
	w.nextPing = time.Now().Add(every)
	w.t = time.AfterFunc(every, w.round)
}

// owePong asks for a pong carrying data. It never blocks.
func (w *wsControl) owePong(data string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.pong, w.owed = []byte(data), true
	switch {
	case w.stopped:
	case w.running:
		w.again = true
	default:
		w.t.Reset(0)
	}
}

// round writes what is owed and due, and schedules the next ping. A
// write that fails stops the rounds: the reader sees the broken
// connection and reports it.
func (w *wsControl) round() {
	w.mu.Lock()
	if w.stopped || w.running {
		w.again = w.running
		w.mu.Unlock()
		return
	}
	w.running = true
	w.rounds.Add(1)
	defer w.rounds.Done()
	for {
		pong, owed := w.pong, w.owed
		w.owed = false
		ping := !time.Now().Before(w.nextPing)
		if ping {
			w.nextPing = time.Now().Add(w.every)
		}
		w.again = false
		w.mu.Unlock()
		var err error
		if owed {
			err = w.conn.WriteControl(websocket.PongMessage, pong, time.Time{})
		}
		if ping && err == nil {
			err = w.conn.WriteControl(websocket.PingMessage, nil, time.Time{})
		}
		w.mu.Lock()
		if err != nil {
			w.stopped = true
		}
		if w.stopped || !w.again {
			break
		}
	}
	w.running = false
	if !w.stopped {
		w.t.Reset(time.Until(w.nextPing))
	}
	w.mu.Unlock()
}

// stop ends the rounds, without waiting for a write in progress.
func (w *wsControl) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
	if w.t != nil {
		w.t.Stop()
	}
}

// wait returns once no write is in progress; after stop, none starts.
func (w *wsControl) wait() { w.rounds.Wait() }

func (l *wsLink) openStream(ctx context.Context) (Stream, error) { return l.streams.open(ctx) }

func (l *wsLink) acceptStream(ctx context.Context) (Stream, error) { return l.streams.accept(ctx) }

func (l *wsLink) close(reason string) error {
	const maxReason = 120 // a close frame's reason is at most 123 bytes
	if len(reason) > maxReason {
		reason = reason[:maxReason]
	}
	l.control.stop()
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, reason)
	if err := l.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second)); err != nil {
		// Best effort: a close frame cut off by its deadline must not be
		// followed by TLS's close_notify (see wsControl).
		if tc, ok := l.conn.NetConn().(interface{ NetConn() net.Conn }); ok {
			_ = tc.NetConn().Close()
		}
	}
	err := l.conn.Close()
	l.control.wait() // its write, if any, fails now
	return err
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
