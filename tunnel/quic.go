package tunnel

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/common/message"
)

// alpnQUIC is the ALPN protocol id of the tunnel on QUIC.
const alpnQUIC = "tether/1"

// QUIC application error codes used when closing a connection.
const (
	quicCodeClosed   quic.ApplicationErrorCode = 0
	quicCodeRefused  quic.ApplicationErrorCode = 1
	quicStreamCancel quic.StreamErrorCode      = 1
)

// quicLink runs a session over one QUIC connection: an ordered control
// stream at the highest priority, one unidirectional stream per large
// message, and bidirectional streams for bulk data.
type quicLink struct {
	conn  *quic.Conn
	ctrl  *quic.Stream
	br    *bufio.Reader
	codec *message.Codec
}

func newQUICLink(conn *quic.Conn, ctrl *quic.Stream, c *message.Codec) *quicLink {
	ctrl.SetPriority(0, false)
	return &quicLink{conn: conn, ctrl: ctrl, br: bufio.NewReaderSize(ctrl, 4096), codec: c}
}

func (l *quicLink) writeFrames(batch []byte) error {
	_, err := l.ctrl.Write(batch)
	return err
}

func (l *quicLink) readFrame() ([]byte, error) { return l.codec.ReadFrame(l.br) }

func (l *quicLink) setDeadline(t time.Time) error { return l.ctrl.SetDeadline(t) }

func (l *quicLink) writeLarge(ctx context.Context, frame []byte) (bool, error) {
	st, err := l.conn.OpenUniStreamSync(ctx)
	if err != nil {
		return true, fmt.Errorf("open stream for large message: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { st.CancelWrite(quicStreamCancel) })
	defer stop()
	if _, err := st.Write(frame); err != nil {
		if ctx.Err() != nil {
			return true, ctx.Err()
		}
		return true, fmt.Errorf("write large message: %w", err)
	}
	return true, st.Close()
}

func (l *quicLink) run(ctx context.Context, g *errgroup.Group, deliver func([]byte) error, fail func(error)) error {
	g.Go(func() error {
		for {
			rs, err := l.conn.AcceptUniStream(ctx)
			if err != nil {
				return nil // the connection is closing; the control stream reports why
			}
			g.Go(func() error {
				body, err := l.codec.ReadFrame(rs)
				if err != nil {
					rs.CancelRead(quicStreamCancel)
					var serr *quic.StreamError
					switch {
					case ctx.Err() != nil:
					case errors.As(err, &serr) && serr.Remote && serr.ErrorCode == quicStreamCancel:
						// The sender gave up on this message (its Send's
						// context ended): drop it, keep the session.
					case errors.Is(err, message.ErrFrameTooLarge), errors.Is(err, message.ErrEmptyFrame), errors.Is(err, io.ErrUnexpectedEOF):
						fail(fmt.Errorf("large-message stream: %w", err))
					}
					return nil
				}
				if _, err := rs.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
					rs.CancelRead(quicStreamCancel)
					fail(fmt.Errorf("large-message stream carries more than one frame: %w", message.ErrMalformed))
					return nil
				}
				return deliver(body)
			})
		}
	})
	for {
		body, err := l.codec.ReadFrame(l.br)
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
		if err := deliver(body); err != nil {
			return err
		}
	}
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

// quicConfig returns the QUIC settings for a tunnel endpoint.
func quicConfig(keepAlive, deadPeer, handshake time.Duration) *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:  handshake,
		MaxIdleTimeout:        deadPeer,
		KeepAlivePeriod:       keepAlive,
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
