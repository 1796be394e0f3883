package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/common/message"
)

// serveWebSocket serves WebSocket over TLS until ctx ends. TLS handshakes
// happen here rather than inside net/http so that each failure is logged
// and counted with its reason.
func (s *Server) serveWebSocket(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	conns := make(chan net.Conn)
	tlsCfg := s.tlsConfig(TransportWebSocket)
	g.Go(func() error {
		stop := context.AfterFunc(gctx, func() { _ = s.tcpLn.Close() })
		defer stop()
		for {
			raw, err := s.tcpLn.Accept()
			if err != nil {
				if gctx.Err() != nil {
					return nil
				}
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					continue
				}
				return fmt.Errorf("accept tcp: %w", err)
			}
			g.Go(func() error {
				s.handshakeTLS(gctx, raw, tlsCfg, conns)
				return nil
			})
		}
	})
	var handlers sync.WaitGroup // hijacked connections, which http.Server does not track
	mux := http.NewServeMux()
	mux.HandleFunc(wsSessionPath, func(w http.ResponseWriter, r *http.Request) {
		handlers.Add(1)
		defer handlers.Done()
		s.handleWSSession(gctx, w, r)
	})
	mux.HandleFunc(wsStreamPath, s.handleWSStream)
	hs := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: s.cfg.HandshakeTimeout,
		ErrorLog:          nil,
		BaseContext:       func(net.Listener) context.Context { return gctx },
	}
	g.Go(func() error {
		err := hs.Serve(&chanListener{conns: conns, ctx: gctx, addr: s.tcpLn.Addr()})
		if errors.Is(err, http.ErrServerClosed) || gctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("serve websocket: %w", err)
	})
	<-gctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = hs.Shutdown(sctx) //nolint:contextcheck // shutting down after ctx ended needs a fresh deadline
	err := g.Wait()
	handlers.Wait()
	return err
}

func (s *Server) handshakeTLS(ctx context.Context, raw net.Conn, cfg *tls.Config, out chan<- net.Conn) {
	conn := tls.Server(raw, cfg)
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	defer cancel()
	if err := conn.HandshakeContext(hctx); err != nil {
		if !errors.Is(err, ErrPeerRefused) { // refusals were logged by VerifyConnection
			s.refused(TransportWebSocket, reasonTLS, raw.RemoteAddr().String(), fmt.Errorf("tls handshake: %w", err))
		}
		_ = raw.Close()
		return
	}
	select {
	case out <- conn:
	case <-ctx.Done():
		_ = conn.Close()
	}
}

// chanListener hands already-handshaken connections to net/http.
type chanListener struct {
	conns <-chan net.Conn
	ctx   context.Context
	addr  net.Addr
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.ctx.Done():
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error   { return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

func (s *Server) handleWSSession(ctx context.Context, w http.ResponseWriter, r *http.Request) {
	remote := r.RemoteAddr
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		s.refused(TransportWebSocket, reasonCertificate, remote, errors.New("no client certificate"))
		http.Error(w, "client certificate required", http.StatusUnauthorized)
		return
	}
	peer := identityOf(r.TLS.PeerCertificates[0])
	conn, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		s.refused(TransportWebSocket, reasonHello, remote, fmt.Errorf("websocket upgrade: %w", err))
		return // the upgrader answered the client
	}
	id := newSessionID()
	streams := &wsServerStreams{peer: peer.Node, incoming: make(chan Stream, 4), pending: make(map[string]chan Stream)}
	l := newWSLink(conn, s.codec, s.cfg.KeepAlive, s.cfg.DeadPeerTimeout, streams)
	if _, err := serverHello(l, s.codec, peer, id, time.Now().Add(s.cfg.HandshakeTimeout)); err != nil {
		s.handshakeFailed(TransportWebSocket, remote, err)
		_ = l.close(err.Error())
		return
	}
	sess := newSession(id, peer, TransportWebSocket, l, s.sessCfg)
	sess.resumed = r.TLS.DidResume
	streams.sess = sess
	s.mu.Lock()
	s.wsByID[id] = streams
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.wsByID, id)
		s.mu.Unlock()
	}()
	s.serve(ctx, sess)
}

// handleWSStream takes a stream connection the client dialled for one of
// its sessions, either on its own (client-opened) or because the server
// asked for it (token set).
func (s *Server) handleWSStream(w http.ResponseWriter, r *http.Request) {
	remote := r.RemoteAddr
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		http.Error(w, "client certificate required", http.StatusUnauthorized)
		return
	}
	peer := identityOf(r.TLS.PeerCertificates[0])
	q := r.URL.Query()
	s.mu.Lock()
	streams := s.wsByID[q.Get("session")]
	s.mu.Unlock()
	if streams == nil || streams.peer != peer.Node {
		s.refused(TransportWebSocket, reasonAuthorize, remote, fmt.Errorf("stream for session %q not held by node %q", q.Get("session"), peer.Node))
		http.Error(w, "no such session", http.StatusForbidden)
		return
	}
	conn, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	conn.SetReadLimit(-1)
	if !streams.arrive(q.Get("token"), &wsStream{conn: conn}) {
		s.refused(TransportWebSocket, reasonOverload, remote, errors.New("stream not expected or too many waiting"))
		_ = conn.Close()
	}
}

// wsServerStreams pairs stream connections with a server-side session.
type wsServerStreams struct {
	peer     string
	sess     *Session
	incoming chan Stream

	mu      sync.Mutex
	pending map[string]chan Stream
}

func (w *wsServerStreams) arrive(token string, st Stream) bool {
	ch := w.incoming
	if token != "" {
		w.mu.Lock()
		ch = w.pending[token]
		delete(w.pending, token)
		w.mu.Unlock()
		if ch == nil {
			return false
		}
	}
	select {
	case ch <- st:
		return true
	default:
		return false
	}
}

func (w *wsServerStreams) open(ctx context.Context) (Stream, error) {
	token := newSessionID()
	ch := make(chan Stream, 1)
	w.mu.Lock()
	w.pending[token] = ch
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.pending, token)
		w.mu.Unlock()
	}()
	if err := w.sess.Send(ctx, &message.Message{Kind: message.KindStreamOpen, Payload: []byte(token)}); err != nil {
		return nil, err
	}
	select {
	case st := <-ch:
		return st, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-w.sess.ctx.Done():
		return nil, ErrSessionClosed
	}
}

func (w *wsServerStreams) accept(ctx context.Context) (Stream, error) {
	select {
	case st := <-w.incoming:
		return st, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-w.sess.ctx.Done():
		return nil, ErrSessionClosed
	}
}

func (w *wsServerStreams) control(context.Context, spawner, *message.Message) error {
	return fmt.Errorf("%w: client sent %s", message.ErrInvalid, message.KindStreamOpen)
}
