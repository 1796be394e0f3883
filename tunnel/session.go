// Package tunnel is the long-lived, mutually authenticated connection
// between EdgeCore and CloudCore: QUIC (preferred) and WebSocket over TLS
// (fallback), both giving one Session with bounded send queues, keepalive
// and dead-peer detection, and bulk streams. It carries common/message
// envelopes and knows nothing of Kubernetes or of what the messages mean.
package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/ratelog"
)

// Transport names the connection a session runs on.
type Transport string

// Transports.
const (
	TransportQUIC      Transport = "quic"
	TransportWebSocket Transport = "websocket"
)

// ErrSessionClosed is returned by Send and Recv once the session has ended;
// the error also wraps the cause when there is one.
var ErrSessionClosed = errors.New("tunnel: session closed")

// Stream is a bulk-data channel between the two ends of a session,
// independent of the message flow.
type Stream interface {
	io.ReadWriteCloser
}

// link is what a transport provides to a session: an ordered frame channel,
// an optional separate path for large frames, and streams.
type link interface {
	// writeFrames writes a batch of complete length-prefixed frames on the
	// ordered channel. Only the session's writer goroutine calls it.
	writeFrames(batch []byte) error
	// writeLarge sends one large length-prefixed frame on a path that does
	// not hold up the ordered channel. ok is false when the transport has no
	// such path, and the frame must go through writeFrames. announce
	// queues the announcement of the path on the ordered channel, for a
	// transport whose peer accepts such paths only when announced (QUIC,
	// alpnQUICAnnounced); it fails only once the session is ending.
	writeLarge(ctx context.Context, frame []byte, announce func() error) (ok bool, err error)
	// run reads frames from every path until the link fails or closes,
	// handing them to sink; it starts its goroutines in g.
	run(ctx context.Context, g spawner, sink linkSink) error
	openStream(ctx context.Context) (Stream, error)
	acceptStream(ctx context.Context) (Stream, error)
	// close ends the connection, telling the peer why when it can.
	close(reason string) error
}

// linkSink is where a link hands what it reads and the faults it finds.
type linkSink struct {
	// deliver decodes and queues one body; an error ends the link.
	deliver func(body []byte) error
	// fail ends the session for a protocol violation found off the main
	// path (on a QUIC large-message stream).
	fail func(err error)
	// drop counts and logs one message refused on its own (its QUIC
	// stream reset) under reason; the session continues.
	drop func(reason string, err error)
}

// controlHandler is implemented by links that take some message kinds for
// themselves (the WebSocket link's stream requests).
type controlHandler interface {
	handleControl(m *message.Message) error
}

// sessionConfig is what a session needs from the server or client config.
type sessionConfig struct {
	codec          *message.Codec
	sendQueueBytes int64
	largeThreshold int
	recvQueue      int
	largeTimeout   time.Duration
	logger         *slog.Logger
	metrics        *Metrics
	// in and out are the message and byte counters of each direction,
	// resolved once for all the sessions of a server or client (they
	// carry no per-session label): about 1 KiB less per session.
	in, out kindCounters
	// logs rate-limits the logs of faults (sessions failed, messages
	// dropped) per node and reason; it is shared by the sessions of one
	// server or client. Every fault is counted.
	logs *ratelog.Limiter
}

// queuedFrame is an encoded frame waiting for the writer, with its kind for
// the metrics. unbounded frames (the announcements of large-message
// streams) hold no bytes of the send queue's semaphore: they are a few
// bytes each, at most one per large message being written.
type queuedFrame struct {
	frame     []byte
	kind      message.Kind
	unbounded bool
}

// Session is one authenticated connection between an edge node and the
// cloud. Send and Recv may be called from several goroutines. Messages
// larger than the large-message threshold travel on their own QUIC stream,
// so they may arrive after smaller messages sent later; callers that need
// order for one object keep at most one message for it in flight.
type Session struct {
	id        string
	peer      Identity
	transport Transport
	resumed   bool        // the TLS handshake resumed an earlier session (a ticket)
	curve     tls.CurveID // the TLS key exchange
	link      link
	cfg       sessionConfig

	// sendBytes bounds the bytes queued for sending (SendQueueBytes).
	sendBytes *semaphore.Weighted
	// sendMu guards sendQ and writing. sendQ holds the frames waiting for
	// the writer, oldest first; it is nil while the session is idle. The
	// writer goroutine runs while there is something to write and for
	// writerLinger after (writing says whether it runs); Send wakes a
	// lingering writer through sendWake.
	sendMu   sync.Mutex
	sendQ    []queuedFrame
	writing  bool
	sendWake chan struct{}
	inbox    *inbox
	goodbye  goodbyeState // goodbye.go
	in       kindCounters // metrics.go
	out      kindCounters

	ctx       context.Context
	cancel    context.CancelCauseFunc
	g         *group
	done      chan struct{}
	closeOnce sync.Once
	err       error // set before done is closed
}

func newSession(id string, peer Identity, t Transport, l link, cfg sessionConfig) *Session {
	ctx, cancel := context.WithCancelCause(context.Background())
	s := &Session{
		id:        id,
		peer:      peer,
		transport: t,
		link:      l,
		cfg:       cfg,
		sendBytes: semaphore.NewWeighted(cfg.sendQueueBytes),
		inbox:     newInbox(cfg.recvQueue),
		sendWake:  make(chan struct{}, 1),
		in:        cfg.in,
		out:       cfg.out,
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
	}
	return s
}

// log returns the session's logger. It is built for each use rather than
// kept: a session logs a few lines in its life (established, ended,
// faults, which are rate-limited), and a logger with attributes kept by
// every idle session is a handler clone each.
func (s *Session) log() *slog.Logger {
	if s.peer.Node == "" { // the client's end, whose logger names its node
		return s.cfg.logger.With("session", s.id, "transport", string(s.transport))
	}
	return s.cfg.logger.With("session", s.id, "transport", string(s.transport), "node", s.peer.Node)
}

// start runs the session's goroutines; done closes when all have ended.
// An idle session holds the link's readers only: the writer runs while
// there is something to send, the close is a context.AfterFunc, and the
// last goroutine to exit closes done (see group).
func (s *Session) start() {
	active := s.cfg.metrics.SessionsActive.WithLabelValues(string(s.transport))
	active.Inc()
	s.g = newGroup(s.cancel, func() {
		s.err = context.Cause(s.ctx)
		active.Dec()
		close(s.done)
		s.log().Info("session ended", "reason", s.err)
	})
	s.g.add() // the close below, counted first so that the group cannot be over before it is registered
	s.g.Go(func() error {
		err := s.link.run(s.ctx, s.g, linkSink{
			deliver: s.deliver,
			fail:    func(err error) { s.fail(reasonFrame, err) },
			drop:    s.drop,
		})
		switch {
		case err == nil:
			err = errPeerClosed
		case errors.Is(err, message.ErrFrameTooLarge), errors.Is(err, message.ErrEmptyFrame),
			errors.Is(err, message.ErrMalformed), errors.Is(err, message.ErrInvalid):
			if s.ctx.Err() == nil { // deliver has not already counted it
				s.fail(reasonFrame, err)
			}
		}
		s.cancel(err)
		return err
	})
	context.AfterFunc(s.ctx, func() {
		defer s.g.exit()
		signal(s.inbox.ready) // a receiver waiting on Ready learns of the end
		reason := "closed"
		if cause := context.Cause(s.ctx); cause != nil && !errors.Is(cause, context.Canceled) {
			reason = cause.Error()
		}
		_ = s.link.close(reason)
	})
}

// errClosedLocally is the cancel cause of Close.
var errClosedLocally = errors.New("closed locally")

// errPeerClosed is the cause when the peer ended the connection cleanly.
var errPeerClosed = errors.New("peer closed the connection")

// ID returns the id the server gave the session.
func (s *Session) ID() string { return s.id }

// Peer returns the verified identity of the other end.
func (s *Session) Peer() Identity { return s.peer }

// Resumed says whether the session's TLS handshake resumed an earlier
// session from a ticket (ConnectionState.DidResume) instead of exchanging
// certificates.
func (s *Session) Resumed() bool { return s.resumed }

// Transport returns the transport the session runs on.
func (s *Session) Transport() Transport { return s.transport }

// RemoteAddr returns the peer's address as this end's socket sees it now:
// the TCP peer of a WebSocket session; the UDP peer of a QUIC session's
// current path, which changes when the client's address does (a NAT
// rebinding: the server moves to the new address once it has validated
// it). Behind a NAT or a load balancer that does not keep the source, it
// is theirs. Nil if unknown.
func (s *Session) RemoteAddr() net.Addr {
	if l, ok := s.link.(interface{ remoteAddr() net.Addr }); ok {
		return l.remoteAddr()
	}
	return nil
}

// Done is closed when the session has ended and its goroutines have exited.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns why the session ended, after Done is closed.
func (s *Session) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// Close ends the session with a reason the peer sees, and waits for its
// goroutines. It is idempotent.
func (s *Session) Close(reason string) error {
	s.Abort(reason)
	<-s.done
	return nil
}

// Abort starts ending the session, like Close, without waiting: Done
// closes once its goroutines have exited. It never blocks, so callbacks
// may call it.
func (s *Session) Abort(reason string) {
	s.closeOnce.Do(func() {
		s.log().Debug("closing session", "reason", reason)
		s.cancel(fmt.Errorf("%w: %s", errClosedLocally, reason))
	})
}

// fail ends the session because of err, counting it, and logging it at
// most once a minute per node and reason (a hostile node can reconnect
// and fail again at will).
func (s *Session) fail(reason string, err error) {
	s.cfg.metrics.Refused.WithLabelValues(string(s.transport), reason).Inc()
	if ok, suppressed := s.cfg.logs.Allow(s.peer.Node + "/" + reason); ok {
		s.log().Warn("closing session", "reason", reason, "err", err, "suppressed", suppressed)
	}
	s.cancel(fmt.Errorf("%s: %w", reason, err))
}

// drop counts a message refused on its own, without ending the session,
// and logs it at most once a minute per node and reason.
func (s *Session) drop(reason string, err error) {
	s.cfg.metrics.Refused.WithLabelValues(string(s.transport), reason).Inc()
	if ok, suppressed := s.cfg.logs.Allow(s.peer.Node + "/" + reason); ok {
		s.log().Warn("message dropped", "reason", reason, "err", err, "suppressed", suppressed)
	}
}

// Send queues m for the peer. It returns when the message is queued, when
// ctx ends, or when the session ends. The send queue is bounded in bytes, so
// a slow peer makes Send wait instead of growing memory.
//
// An error that does not wrap ErrSessionClosed means that this message
// was not sent and the session continues: ctx ended, or the message is
// over the frame limit (message.ErrFrameTooLarge, before anything is
// sent). On QUIC a large message travels on its own stream and Send
// returns once it is written; if the peer resets that stream, for being
// over the peer's own limit (message.ErrFrameTooLarge) or for not
// arriving within its LargeMessageTimeout (ErrLargeMessageTimeout), only
// that message is lost.
func (s *Session) Send(ctx context.Context, m *message.Message) error {
	if s.ctx.Err() != nil {
		return s.sendErr(nil)
	}
	frame, err := s.cfg.codec.AppendFrame(nil, m)
	if err != nil {
		return fmt.Errorf("send %s: %w", m.Kind, err)
	}
	n := int64(len(frame))
	if !s.sendBytes.TryAcquire(n) {
		if err := s.acquire(ctx, n); err != nil {
			return err
		}
	}
	if len(frame) > s.cfg.largeThreshold {
		ok, err := s.link.writeLarge(ctx, frame, s.announceLarge)
		if ok {
			s.sendBytes.Release(n)
			if err != nil {
				return s.sendErr(fmt.Errorf("send large %s: %w", m.Kind, err))
			}
			s.out.add(m.Kind, len(frame))
			return nil
		}
	}
	return s.enqueue(queuedFrame{frame: frame, kind: m.Kind})
}

// announceLarge queues the announcement of a large-message stream
// (KindStreamOpen, on QUIC with alpnQUICAnnounced) without waiting for
// room in the send queue: once the stream is open its peer must learn of
// it, whatever the sender's context says.
func (s *Session) announceLarge() error {
	if s.ctx.Err() != nil {
		return s.sendErr(nil)
	}
	frame, err := s.cfg.codec.AppendFrame(nil, &message.Message{Kind: message.KindStreamOpen})
	if err != nil {
		return fmt.Errorf("encode announcement: %w", err)
	}
	return s.enqueue(queuedFrame{frame: frame, kind: message.KindStreamOpen, unbounded: true})
}

// enqueue appends q to the send queue and starts the writer if it is not
// running.
func (s *Session) enqueue(q queuedFrame) error {
	s.sendMu.Lock()
	s.sendQ = append(s.sendQ, q)
	startWriter := !s.writing
	s.writing = true
	s.sendMu.Unlock()
	if !startWriter {
		signal(s.sendWake) // the writer may be lingering
		return nil
	}
	if !s.g.tryGo(s.writeLoop) {
		return s.sendErr(errors.New("send: session ended")) // the group ends only after the session's context
	}
	return nil
}

// writerLinger is how long the writer goroutine waits for more to send
// before it exits. A new goroutine starts on a small stack that the write
// path (TLS, QUIC or WebSocket framing) must grow by copying, which cost
// ping-pong traffic about 15 µs per round trip when the writer exited at
// once; a session idle for longer than this holds no writer.
const writerLinger = 100 * time.Millisecond

func (s *Session) acquire(ctx context.Context, n int64) error {
	if n > s.cfg.sendQueueBytes {
		return fmt.Errorf("send: frame of %d bytes exceeds the send queue of %d", n, s.cfg.sendQueueBytes)
	}
	actx, stop := context.WithCancel(ctx)
	defer stop()
	unregister := context.AfterFunc(s.ctx, stop)
	defer unregister()
	if err := s.sendBytes.Acquire(actx, n); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return s.sendErr(nil)
	}
	return nil
}

func (s *Session) sendErr(err error) error {
	if s.ctx.Err() != nil {
		return fmt.Errorf("%w: %w", ErrSessionClosed, context.Cause(s.ctx))
	}
	return err
}

// writeLoop drains the send queue, batching whatever is queued into one
// write, and releases the queue's bytes once written; it returns when the
// queue has stayed empty for writerLinger (Send starts it again) or the
// session ends. A batch is
// one frame or several that total at most limit bytes (maxBatch, or one
// frame of the size limit if that is smaller): a frame that would take it
// past that waits for the next write. On WebSocket, where a write is one
// message, no message is therefore larger than one frame of MaxFrame.
func (s *Session) writeLoop() error {
	limit := min(maxBatch, s.cfg.codec.MaxFrame()+frameHeaderLen)
	var linger *time.Timer
	defer func() {
		if linger != nil {
			linger.Stop()
		}
	}()
	for s.ctx.Err() == nil {
		s.sendMu.Lock()
		if len(s.sendQ) == 0 {
			s.sendQ = nil // an idle session holds no queue
			s.sendMu.Unlock()
			if linger == nil {
				linger = time.NewTimer(writerLinger)
			} else {
				linger.Reset(writerLinger)
			}
			select {
			case <-s.sendWake:
				continue
			case <-s.ctx.Done():
				return nil
			case <-linger.C:
			}
			s.sendMu.Lock()
			if len(s.sendQ) > 0 { // queued as the timer fired
				s.sendMu.Unlock()
				continue
			}
			s.writing = false
			s.sendMu.Unlock()
			return nil
		}
		// An idle session holds no batch buffer: it borrows one per burst.
		bp := batchPool.Get().(*[]byte)
		batch := append((*bp)[:0], s.sendQ[0].frame...)
		count := 1
		for count < len(s.sendQ) && len(batch)+len(s.sendQ[count].frame) <= limit {
			batch = append(batch, s.sendQ[count].frame...)
			count++
		}
		// The batch's entries stay ours after the unlock: Send only
		// appends past them. They are counted once written, then let go.
		written := s.sendQ[:count]
		s.sendQ = s.sendQ[count:]
		s.sendMu.Unlock()
		err := s.link.writeFrames(batch)
		held := len(batch)
		for _, q := range written {
			if q.unbounded {
				held -= len(q.frame)
			}
		}
		s.sendBytes.Release(int64(held))
		if cap(batch) <= 4*maxBatch {
			*bp = batch
			batchPool.Put(bp)
		}
		if err != nil {
			clear(written)
			return fmt.Errorf("write frames: %w", err)
		}
		for _, q := range written {
			s.out.add(q.kind, len(q.frame))
		}
		clear(written)
	}
	return nil
}

// maxBatch is how many bytes of queued frames the writer joins into one write.
const maxBatch = 64 << 10

// frameHeaderLen is the size of a frame's length prefix.
const frameHeaderLen = 4

var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, maxBatch); return &b }}

// deliver decodes one received body and queues it for Recv. A body that
// does not decode or validate ends the session: the peer is broken or
// hostile, and nothing after it can be trusted to be framed right.
func (s *Session) deliver(body []byte) error {
	m := new(message.Message)
	if err := s.cfg.codec.Unmarshal(body, m); err != nil {
		s.fail(reasonFrame, err)
		return fmt.Errorf("receive: %w", err)
	}
	if m.Kind == message.KindStreamOpen {
		h, ok := s.link.(controlHandler)
		if !ok {
			err := fmt.Errorf("%w: %s on a %s session", message.ErrInvalid, m.Kind, s.transport)
			s.fail(reasonFrame, err)
			return err
		}
		if err := h.handleControl(m); err != nil {
			s.fail(reasonFrame, err)
			return err
		}
		return nil
	}
	s.in.add(m.Kind, len(body)+frameHeaderLen)
	if m.Kind == message.KindGoodbye && s.goodbye.take {
		return s.takeGoodbye(m)
	}
	if !s.inbox.put(m, s.ctx.Done()) {
		return context.Cause(s.ctx)
	}
	return nil
}

// Recv returns the next message from the peer. Messages received before the
// session ended are still returned; after them Recv returns an error that
// wraps ErrSessionClosed.
func (s *Session) Recv(ctx context.Context) (*message.Message, error) {
	for {
		if m, ok := s.inbox.take(); ok {
			return m, nil
		}
		select {
		case <-s.inbox.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-s.ctx.Done():
			if m, ok := s.inbox.take(); ok {
				return m, nil
			}
			return nil, fmt.Errorf("%w: %w", ErrSessionClosed, context.Cause(s.ctx))
		}
	}
}

// Ready returns a channel that receives when TryRecv may have something
// to return: a message arrived, or the session ended. It lets one
// goroutine serve the session along with other events, instead of one
// goroutine blocked in Recv per session: select on Ready, then call
// TryRecv until it returns no message. That goroutine must be the
// session's only receiver.
func (s *Session) Ready() <-chan struct{} { return s.inbox.ready }

// TryRecv returns the next message from the peer without waiting, or nil
// and a nil error when none has arrived. Like Recv, it returns the
// messages received before the session ended, then an error that wraps
// ErrSessionClosed.
func (s *Session) TryRecv() (*message.Message, error) {
	if m, ok := s.inbox.take(); ok {
		return m, nil
	}
	if s.ctx.Err() == nil {
		return nil, nil
	}
	if m, ok := s.inbox.take(); ok { // queued as the session ended
		return m, nil
	}
	return nil, fmt.Errorf("%w: %w", ErrSessionClosed, context.Cause(s.ctx))
}

// OpenStream opens a bulk-data stream to the peer.
func (s *Session) OpenStream(ctx context.Context) (Stream, error) {
	st, err := s.link.openStream(ctx)
	if err != nil {
		return nil, s.sendErr(fmt.Errorf("open stream: %w", err))
	}
	return st, nil
}

// AcceptStream waits for the peer to open a bulk-data stream.
func (s *Session) AcceptStream(ctx context.Context) (Stream, error) {
	st, err := s.link.acceptStream(ctx)
	if err != nil {
		return nil, s.sendErr(fmt.Errorf("accept stream: %w", err))
	}
	return st, nil
}
