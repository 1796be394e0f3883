package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tetheredge/tether/common/message"
)

// alpnQUIC is the ALPN protocol id of the tunnel on QUIC.
const alpnQUIC = "tether/1"

// QUIC application error codes used when closing a connection.
const (
	quicCodeClosed  quic.ApplicationErrorCode = 0
	quicCodeRefused quic.ApplicationErrorCode = 1
)

// QUIC stream error codes, with which one end resets a stream.
const (
	// quicStreamCancel: the sender gave up on the message (its Send's
	// context ended), or the receiver is closing.
	quicStreamCancel quic.StreamErrorCode = 1
	// quicStreamTooLarge: the receiver refused a large message over its
	// frame limit; the sender's Send returns message.ErrFrameTooLarge.
	quicStreamTooLarge quic.StreamErrorCode = 2
	// quicStreamTimeout: the large message was not complete within the
	// receiver's LargeMessageTimeout.
	quicStreamTimeout quic.StreamErrorCode = 3
)

// ErrLargeMessageTimeout is wrapped by the error of a Send whose large
// message the peer reset for not arriving within its LargeMessageTimeout.
// Only that message is lost; the session continues.
var ErrLargeMessageTimeout = errors.New("tunnel: peer reset a large message that did not arrive within its timeout")

// alpnQUICAnnounced is the QUIC ALPN protocol of peers that announce
// every large-message stream on the control stream (a KindStreamOpen)
// once it is open, so that the receiver accepts such streams only when
// one is coming instead of holding a goroutine blocked in
// AcceptUniStream for the life of every session. A client offers it
// before alpnQUIC and a server prefers it; either end of an older
// version offers or accepts alpnQUIC alone, which keeps that acceptor
// (docs/protocol.md, "Frames").
const alpnQUICAnnounced = "tether/1a"

// maxAnnounced bounds the large-message streams announced and not yet
// accepted or read: twice the streams a peer may have open at once
// (MaxIncomingUniStreams), for the moments when a stream is being
// closed at one end while the next is announced. More is a broken peer.
const maxAnnounced = 32

// quicLink runs a session over one QUIC connection: an ordered control
// stream at the highest priority, one unidirectional stream per large
// message, and bidirectional streams for bulk data.
//
// The control stream is read without a buffer of its own: quic-go holds
// what arrived, and a frame costs two reads (prefix and body), while a
// buffer would be held by every idle session.
type quicLink struct {
	conn         *quic.Conn
	ctrl         *quic.Stream
	codec        *message.Codec
	largeTimeout time.Duration // how long one incoming large message may take
	// announced: the connection negotiated alpnQUICAnnounced, so both
	// ends announce their large-message streams. Otherwise a goroutine
	// accepts them as they come.
	announced bool

	// Set by run before the first frame is read; used by handleControl,
	// which run's loop calls, to accept announced streams.
	ctx      context.Context
	g        spawner
	sink     linkSink
	awaiting atomic.Int32 // announced streams not yet read to their end
}

func newQUICLink(conn *quic.Conn, ctrl *quic.Stream, c *message.Codec, largeTimeout time.Duration) *quicLink {
	ctrl.SetPriority(0, false)
	return &quicLink{
		conn: conn, ctrl: ctrl, codec: c, largeTimeout: largeTimeout,
		announced: conn.ConnectionState().TLS.NegotiatedProtocol == alpnQUICAnnounced,
	}
}

func (l *quicLink) writeFrames(batch []byte) error {
	_, err := l.ctrl.Write(batch)
	return err
}

func (l *quicLink) readFrame() ([]byte, error) { return l.codec.ReadFrame(l.ctrl) }

func (l *quicLink) remoteAddr() net.Addr { return l.conn.RemoteAddr() }

func (l *quicLink) setDeadline(t time.Time) error { return l.ctrl.SetDeadline(t) }

func (l *quicLink) interrupt() { _ = l.ctrl.SetDeadline(time.Now()) }

// writeLarge opens a unidirectional stream for frame and, when the
// connection announces its large-message streams, has announce queue the
// announcement on the control stream before the data is written: every
// announcement is of a stream that exists, which the peer accepts even if
// this write is cancelled after (it is then reset).
func (l *quicLink) writeLarge(ctx context.Context, frame []byte, announce func() error) (bool, error) {
	st, err := l.conn.OpenUniStreamSync(ctx)
	if err != nil {
		return true, fmt.Errorf("open stream for large message: %w", err)
	}
	if l.announced {
		if err := announce(); err != nil { // the session is ending
			st.CancelWrite(quicStreamCancel)
			return true, fmt.Errorf("announce large message: %w", err)
		}
	}
	stop := context.AfterFunc(ctx, func() { st.CancelWrite(quicStreamCancel) })
	defer stop()
	if _, err := st.Write(frame); err != nil {
		if ctx.Err() != nil {
			return true, ctx.Err()
		}
		var serr *quic.StreamError
		if errors.As(err, &serr) && serr.Remote {
			switch serr.ErrorCode {
			case quicStreamTooLarge:
				return true, fmt.Errorf("write large message: peer refused it: %w", message.ErrFrameTooLarge)
			case quicStreamTimeout:
				return true, fmt.Errorf("write large message: %w", ErrLargeMessageTimeout)
			}
		}
		return true, fmt.Errorf("write large message: %w", err)
	}
	return true, st.Close()
}

func (l *quicLink) run(ctx context.Context, g spawner, sink linkSink) error {
	l.ctx, l.g, l.sink = ctx, g, sink
	if !l.announced {
		// A peer that does not announce its streams (an older version):
		// one goroutine accepts them for the life of the session.
		g.Go(func() error {
			for {
				rs, err := l.conn.AcceptUniStream(ctx)
				if err != nil {
					return nil // the connection is closing; the control stream reports why
				}
				g.Go(func() error { return l.readLarge(ctx, rs, sink) })
			}
		})
	}
	for {
		body, err := l.codec.ReadFrame(l.ctrl)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			var appErr *quic.ApplicationError
			if errors.As(err, &appErr) && appErr.Remote {
				if appErr.ErrorCode == quicCodeClosed {
					return fmt.Errorf("%w: %s", errPeerClosed, appErr.ErrorMessage)
				}
				return fmt.Errorf("peer closed the connection: %s", appErr.ErrorMessage)
			}
			return fmt.Errorf("read control stream: %w", err)
		}
		if err := sink.deliver(body); err != nil {
			return err
		}
	}
}

// handleControl takes the announcement of a large-message stream
// (KindStreamOpen, on a connection that negotiated alpnQUICAnnounced) and
// starts a goroutine that accepts the next stream and reads it. Streams
// are accepted in the order they were opened, whichever goroutine takes
// which: what matters is one accept per stream. The wait for the stream
// has no deadline of its own: the stream is open at the sender before it
// is announced, but its first bytes may wait behind other streams and
// flow control, and LargeMessageTimeout runs from its arrival as it did
// before announcements. A peer that announces streams it never sends
// holds at most maxAnnounced goroutines; an announcement beyond them, or
// one on a connection that did not negotiate them, is a broken peer and
// ends the session.
func (l *quicLink) handleControl(m *message.Message) error {
	if !l.announced {
		return fmt.Errorf("%w: %s on a QUIC session without %s", message.ErrInvalid, m.Kind, alpnQUICAnnounced)
	}
	if l.awaiting.Add(1) > maxAnnounced {
		return fmt.Errorf("%w: more than %d large-message streams announced and not yet read", message.ErrInvalid, maxAnnounced)
	}
	l.g.Go(func() error {
		defer l.awaiting.Add(-1)
		rs, err := l.conn.AcceptUniStream(l.ctx)
		if err != nil {
			return nil // the connection is closing; the control stream reports why
		}
		return l.readLarge(l.ctx, rs, l.sink)
	})
	return nil
}

// readLarge reads the one frame of a large-message stream and delivers it.
// The stream is self-contained, so what goes wrong with it alone is dealt
// with alone: a message over the frame limit, or one not complete within
// largeTimeout, resets this stream, is counted, and the session continues
// (its body is allocated as it arrives, so a stalled stream pins what was
// sent, not what was declared). A stream that ends inside its frame or
// carries more than one is a broken peer, and ends the session.
func (l *quicLink) readLarge(ctx context.Context, rs *quic.ReceiveStream, sink linkSink) error {
	_ = rs.SetReadDeadline(time.Now().Add(l.largeTimeout)) // cannot fail
	body, err := l.codec.ReadFrame(rs)
	if err == nil {
		// The frame must be followed by the stream's end.
		var n int
		n, err = rs.Read(make([]byte, 1))
		switch {
		case errors.Is(err, io.EOF) && n == 0:
			return sink.deliver(body)
		case n > 0:
			rs.CancelRead(quicStreamCancel)
			sink.fail(fmt.Errorf("large-message stream carries more than one frame: %w", message.ErrMalformed))
			return nil
		}
	}
	var serr *quic.StreamError
	switch {
	case ctx.Err() != nil:
		rs.CancelRead(quicStreamCancel)
	case errors.As(err, &serr) && serr.Remote && serr.ErrorCode == quicStreamCancel:
		// The sender gave up on this message (its Send's context ended).
	case errors.Is(err, os.ErrDeadlineExceeded):
		sink.drop(reasonLargeTimeout, fmt.Errorf("large message not complete within %s: %w", l.largeTimeout, err))
		rs.CancelRead(quicStreamTimeout) // after counting, so that the count is visible when the peer learns
	case errors.Is(err, message.ErrFrameTooLarge):
		sink.drop(reasonTooLarge, fmt.Errorf("large-message stream: %w", err))
		rs.CancelRead(quicStreamTooLarge)
	case errors.Is(err, message.ErrEmptyFrame), errors.Is(err, io.ErrUnexpectedEOF):
		rs.CancelRead(quicStreamCancel)
		sink.fail(fmt.Errorf("large-message stream: %w", err))
	default: // the connection is failing; the control stream reports why
		rs.CancelRead(quicStreamCancel)
	}
	return nil
}

func (l *quicLink) openStream(ctx context.Context) (Stream, error) {
	st, err := l.conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	return quicStream{st}, nil
}

func (l *quicLink) acceptStream(ctx context.Context) (Stream, error) {
	st, err := l.conn.AcceptStream(ctx)
	if err != nil {
		return nil, err
	}
	return quicStream{st}, nil
}

func (l *quicLink) close(reason string) error {
	return l.conn.CloseWithError(quicCodeClosed, reason)
}

// quicStream closes both directions on Close: the write side gracefully
// (the peer reads what was written, then EOF), the read side abruptly.
type quicStream struct{ *quic.Stream }

func (s quicStream) Close() error {
	s.CancelRead(quicStreamCancel)
	return s.Stream.Close()
}

// quicProtos returns the ALPN protocols an end of QUIC offers, in its
// order of preference (a server's decides).
func quicProtos(o Options) []string {
	if o.unannounced {
		return []string{alpnQUIC}
	}
	return []string{alpnQUICAnnounced, alpnQUIC}
}

// quicConfig returns the QUIC settings for a tunnel endpoint.
func quicConfig(o Options, handshake time.Duration) *quic.Config {
	return &quic.Config{
		DisablePathMTUDiscovery: !o.PathMTUDiscovery,
		// The smallest size QUIC allows (RFC 9000, 14): every datagram
		// carrying an Initial packet is padded to it, the client's first
		// two and the server's first, so a handshake costs 240 B less
		// than at quic-go's default of 1,280 B. Bulk data travels in
		// about 7 % more packets (path-MTU discovery, when on, starts
		// from here).
		InitialPacketSize:    1200,
		HandshakeIdleTimeout: handshake,
		MaxIdleTimeout:       quicIdleTimeout(o.KeepAlive, o.DeadPeerTimeout),
		// quic-go sends a keepalive PING only when nothing has been
		// received for the period: a path busy with frames carries none.
		KeepAlivePeriod:       o.KeepAlive,
		MaxIncomingStreams:    16,
		MaxIncomingUniStreams: 16,
		// Windows start small so that idle sessions stay cheap, and grow
		// for bulk transfers.
		InitialStreamReceiveWindow:     64 << 10,
		MaxStreamReceiveWindow:         8 << 20,
		InitialConnectionReceiveWindow: 128 << 10,
		MaxConnectionReceiveWindow:     16 << 20,
	}
}

// quicIdleTimeout returns the QUIC idle timeout that declares a silent
// peer dead within half a keepalive of deadPeer after it was last heard.
//
// QUIC's idle timer (RFC 9000, 10.1) runs from the last packet received,
// or from the first ack-eliciting packet sent after it; quic-go sends a
// keepalive PING once nothing has been heard for k = min(keepAlive,
// idle/2). So a peer last heard at t is declared dead at t + idle when
// this end sent data after hearing it (the peer stopped before acking
// it), and at t + idle + k when it did not (the PING restarts the timer).
// With an idle timeout of deadPeer the second case waits a whole
// keepalive longer than asked (20 s instead of 15 s by default). Centring
// both cases on deadPeer, idle + k/2 = deadPeer, gives the larger of
// deadPeer - keepAlive/2 and 4/5 of deadPeer. A peer that stops is then
// declared dead between deadPeer - keepAlive/2 (less one ack delay) and
// deadPeer + keepAlive/2 after it stopped.
//
// quic-go takes the smaller of both ends' idle timeouts; both ends compute
// it the same way.
func quicIdleTimeout(keepAlive, deadPeer time.Duration) time.Duration {
	return max(deadPeer-keepAlive/2, deadPeer*4/5)
}
