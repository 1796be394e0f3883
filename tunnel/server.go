package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/quic-go/quic-go"
	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/ratelog"
)

// Handler serves one established session. The server closes the session
// when Handle returns; ctx ends when the server shuts down.
type Handler interface {
	Handle(ctx context.Context, s *Session)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, s *Session)

// Handle calls f.
func (f HandlerFunc) Handle(ctx context.Context, s *Session) { f(ctx, s) }

// ServerConfig configures a Server.
type ServerConfig struct {
	Options
	// QUICAddr is the UDP address for QUIC, such as ":10000". Empty
	// disables QUIC.
	QUICAddr string
	// WebSocketAddr is the TCP address for WebSocket over TLS. Empty
	// disables WebSocket.
	WebSocketAddr string
	// TLS holds the server certificate (Certificates or GetCertificate).
	// Its ClientCAs is the pool client certificates must chain to, unless
	// ClientCAs below is set. The server enforces TLS 1.3 and mutual
	// authentication whatever else it says. Required.
	TLS *tls.Config
	// ClientCAs, when set, returns the current client CA pool for each
	// handshake (so the pool can change while the server runs).
	ClientCAs func() *x509.CertPool
	// Authorize, when set, is asked about every verified client during the
	// TLS handshake; an error refuses the client with that reason.
	Authorize func(Identity) error
	// Handler serves established sessions. Required.
	Handler Handler
	// Now returns the time used to check certificate validity.
	// Default time.Now.
	Now func() time.Time
	// StatelessResetKey, when set, lets this server end at once the QUIC
	// connections of an earlier run of it that used the same key (after a
	// crash or a restart): a packet of such a connection is answered with a
	// stateless reset (RFC 9000, 10.3), so the edge reconnects at its next
	// write (lease, status) instead of waiting for its dead-peer timeout.
	// quic-go answers only packets over 42 B, which keepalive PINGs are
	// not: an edge that writes nothing waits for its timeout. It must stay
	// the same across restarts and be secret. Nil: no resets.
	StatelessResetKey *[32]byte
	// SessionTicketSecret, when set, makes the server issue TLS 1.3
	// session tickets sealed with keys derived from it (see ticket.go), so
	// that a client resumes instead of exchanging certificates again. Every
	// replica of one cloud must be given the same secret, so that a ticket
	// from one is accepted by the others; it must be secret. Nil: no
	// tickets, every handshake is a full one.
	SessionTicketSecret *[32]byte
	// TicketRotation is the epoch of the ticket keys: a ticket is accepted
	// during the epoch it was issued in and the next, so for one to two
	// rotations. Default 12h.
	TicketRotation time.Duration
	// MaxHandshakes bounds the QUIC connections in their handshake (TLS
	// and hello) at once. A new connection past it is refused at once
	// with CONNECTION_REFUSED (counted as refused, reason
	// handshakes_busy), and the edge tries again after its back-off:
	// established sessions keep the CPU and the socket, and a reconnect
	// storm is spread instead of every handshake timing out together.
	// Zero: DefaultMaxHandshakes; negative: no bound. WebSocket
	// handshakes are not bounded.
	MaxHandshakes int
}

// DefaultMaxHandshakes is ServerConfig.MaxHandshakes's default.
const DefaultMaxHandshakes = 256

// reasonBusy counts the QUIC connections refused because MaxHandshakes
// were in flight.
const reasonBusy = "handshakes_busy"

// Server accepts edge sessions on QUIC and on WebSocket over TLS at once.
type Server struct {
	cfg     ServerConfig
	codec   *message.Codec
	metrics *Metrics
	logger  *slog.Logger
	sessCfg sessionConfig
	// logs rate-limits the logs of refusals, per transport and reason,
	// and of the sessions' own faults; every refusal is counted.
	logs *ratelog.Limiter
	// tickets seals session tickets; nil when SessionTicketSecret is.
	tickets *ticketSealer
	// handshakes holds a token per QUIC connection in its handshake
	// (MaxHandshakes); nil: no bound.
	handshakes chan struct{}

	mu       sync.Mutex
	quicLn   *quic.Listener
	quicTr   *quic.Transport // owns the UDP socket, so Run can release it
	tcpLn    net.Listener
	wsByID   map[string]*wsServerStreams
	upgrader websocket.Upgrader
}

// NewServer validates cfg and returns a server. Listen or Run binds it.
func NewServer(cfg ServerConfig) (*Server, error) {
	opts, err := cfg.Options.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("tunnel server config: %w", err)
	}
	cfg.Options = opts
	if cfg.TLS == nil || (len(cfg.TLS.Certificates) == 0 && cfg.TLS.GetCertificate == nil) {
		return nil, errors.New("tunnel server config: TLS with a server certificate is required")
	}
	if cfg.ClientCAs == nil {
		pool := cfg.TLS.ClientCAs
		if pool == nil {
			return nil, errors.New("tunnel server config: a client CA pool is required")
		}
		cfg.ClientCAs = func() *x509.CertPool { return pool }
	}
	if cfg.Handler == nil {
		return nil, errors.New("tunnel server config: Handler is required")
	}
	if cfg.QUICAddr == "" && cfg.WebSocketAddr == "" {
		return nil, errors.New("tunnel server config: no QUIC or WebSocket address")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.TicketRotation <= 0 {
		cfg.TicketRotation = 12 * time.Hour
	}
	if cfg.MaxHandshakes == 0 {
		cfg.MaxHandshakes = DefaultMaxHandshakes
	}
	metrics, err := newMetrics(opts.Registerer, "server")
	if err != nil {
		return nil, fmt.Errorf("tunnel server: %w", err)
	}
	s := &Server{
		cfg:     cfg,
		codec:   message.NewCodec(opts.MaxFrame),
		metrics: metrics,
		logger:  opts.Logger.With("component", "tunnel_server"),
		wsByID:  make(map[string]*wsServerStreams),
	}
	s.logs = ratelog.New(0, nil)
	if cfg.MaxHandshakes > 0 {
		s.handshakes = make(chan struct{}, cfg.MaxHandshakes)
	}
	if cfg.SessionTicketSecret != nil {
		s.tickets = &ticketSealer{secret: *cfg.SessionTicketSecret, period: cfg.TicketRotation, now: cfg.Now}
	}
	s.sessCfg = opts.sessionConfig(s.codec, metrics, s.logs)
	s.upgrader = websocket.Upgrader{
		HandshakeTimeout: opts.HandshakeTimeout,
		ReadBufferSize:   0,        // reuse net/http's reader
		WriteBufferSize:  64 << 10, // borrowed from the pool while writing only
		WriteBufferPool:  &sync.Pool{},
	}
	return s, nil
}

// Metrics returns the server's counters.
func (s *Server) Metrics() *Metrics { return s.metrics }

// tlsConfig returns the per-handshake TLS config for a transport: TLS 1.3
// only, a client certificate required and verified by verifyClient, then
// passed to the Authorize hook.
func (s *Server) tlsConfig(t Transport) *tls.Config {
	base := s.cfg.TLS.Clone()
	base.MinVersion = tls.VersionTLS13
	// Certificates are requested, and their presence and validity decided
	// in VerifyConnection, so that every refusal is logged and counted the
	// same way on both transports.
	base.ClientAuth = tls.RequestClientCert
	// Session tickets only with a secret shared by the replicas (see
	// ticket.go); crypto/tls's own per-process keys would make tickets
	// that another replica, or this one after a restart, cannot open.
	base.Time = s.cfg.Now
	base.SessionTicketsDisabled = s.tickets == nil
	if s.tickets != nil {
		base.WrapSession = s.wrapSession
	}
	if t == TransportQUIC {
		base.NextProtos = quicProtos(s.cfg.Options)
	} else {
		base.NextProtos = []string{"http/1.1"}
	}
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		c.GetConfigForClient = nil
		remote := ""
		if hello.Conn != nil && hello.Conn.RemoteAddr() != nil {
			remote = hello.Conn.RemoteAddr().String()
		}
		pool := s.cfg.ClientCAs()
		c.ClientCAs = pool
		if s.tickets != nil {
			c.UnwrapSession, c.WrapSession = s.sessionHooks(t, remote, slices.Contains(hello.SupportedProtos, alpnKeepTicket))
		}
		offeredTicket := slices.Contains(hello.Extensions, extensionPreSharedKey)
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			id, err := verifyClient(cs, pool, s.cfg.Now())
			if err != nil {
				s.refused(t, reasonCertificate, remote, err)
				return err
			}
			if s.cfg.Authorize != nil {
				if err := s.cfg.Authorize(id); err != nil {
					err = fmt.Errorf("%w: node %q: %w", ErrPeerRefused, id.Node, err)
					s.refused(t, reasonAuthorize, remote, err)
					return err
				}
			}
			if offeredTicket && !cs.DidResume && !postQuantum(cs.CurveID) && s.tickets != nil {
				// The client offered a ticket with an X25519 key share
				// only, and the ticket was declined: refused rather than
				// completed as a classical full handshake whose ticket
				// would carry on without post-quantum protection. The
				// client drops its ticket and makes a hybrid one.
				err := fmt.Errorf("%w: session ticket declined and no post-quantum key exchange; reconnect without the ticket", ErrPeerRefused)
				s.refused(t, reasonTicketDeclined, remote, err)
				return err
			}
			return nil
		}
		return c, nil
	}
	return base
}

func (s *Server) refused(t Transport, reason, remote string, err error) {
	s.metrics.Refused.WithLabelValues(string(t), reason).Inc()
	if ok, suppressed := s.logs.Allow(string(t) + "/" + reason); ok {
		s.logger.Warn("peer refused", "transport", string(t), "remote", remote, "reason", reason, "err", err, "suppressed", suppressed)
	}
}

// Listen binds the configured addresses. Run calls it when it has not been
// called; calling it first lets a caller learn the bound addresses.
func (s *Server) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.quicTr != nil || s.tcpLn != nil {
		return nil
	}
	if s.cfg.QUICAddr != "" {
		udpAddr, err := net.ResolveUDPAddr("udp", s.cfg.QUICAddr)
		if err != nil {
			return fmt.Errorf("listen quic %s: %w", s.cfg.QUICAddr, err)
		}
		udp, err := net.ListenUDP("udp", udpAddr)
		if err != nil {
			return fmt.Errorf("listen quic %s: %w", s.cfg.QUICAddr, err)
		}
		// The transport reads the socket only once Run listens on it: a
		// listener handshakes by itself, before Accept, and the owner may
		// not be ready to authorise peers yet (CloudCore's whitelist
		// syncs between Listen and Run). Until then datagrams wait in
		// the socket's buffer, and edges' retransmissions with them.
		tr := &quic.Transport{Conn: udp, ConnContext: s.admit}
		if k := s.cfg.StatelessResetKey; k != nil {
			key := quic.StatelessResetKey(*k)
			tr.StatelessResetKey = &key
		}
		s.quicTr = tr
	}
	if s.cfg.WebSocketAddr != "" {
		ln, err := net.Listen("tcp", s.cfg.WebSocketAddr)
		if err != nil {
			if s.quicTr != nil {
				s.closeQUIC()
			}
			return fmt.Errorf("listen tcp %s: %w", s.cfg.WebSocketAddr, err)
		}
		s.tcpLn = ln
	}
	return nil
}

func (s *Server) closeQUIC() {
	if s.quicLn != nil {
		_ = s.quicLn.Close()
	}
	_ = s.quicTr.Close()
	_ = s.quicTr.Conn.Close()
}

// QUICAddr returns the bound UDP address, or nil.
func (s *Server) QUICAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.quicTr == nil {
		return nil
	}
	return s.quicTr.Conn.LocalAddr()
}

// quicListening reports whether QUIC handshakes are answered: Run is
// listening, or there is no QUIC address.
func (s *Server) quicListening() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.quicTr == nil || s.quicLn != nil
}

// WebSocketAddr returns the bound TCP address, or nil.
func (s *Server) WebSocketAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tcpLn == nil {
		return nil
	}
	return s.tcpLn.Addr()
}

// Run serves until ctx ends, then closes every session and returns after
// all of the server's goroutines have exited.
func (s *Server) Run(ctx context.Context) error {
	if err := s.Listen(); err != nil {
		return err
	}
	g, ctx := errgroup.WithContext(ctx)
	if s.quicTr != nil {
		ln, err := s.quicTr.Listen(s.tlsConfig(TransportQUIC), quicConfig(s.cfg.Options, s.cfg.HandshakeTimeout))
		if err != nil {
			s.closeQUIC()
			if s.tcpLn != nil {
				_ = s.tcpLn.Close()
			}
			return fmt.Errorf("listen quic %s: %w", s.cfg.QUICAddr, err)
		}
		s.mu.Lock()
		s.quicLn = ln
		s.mu.Unlock()
		g.Go(func() error { return s.serveQUIC(ctx, g) })
	}
	if s.tcpLn != nil {
		g.Go(func() error { return s.serveWebSocket(ctx) })
	}
	s.logger.Info("tunnel server listening", "quic", s.QUICAddr(), "websocket", s.WebSocketAddr())
	<-ctx.Done()
	err := g.Wait()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

func (s *Server) serveQUIC(ctx context.Context, g *errgroup.Group) error {
	// Accept(ctx) returns when ctx ends. Closing the transport, not just
	// the listener, ends lingering connections and releases the port.
	defer s.closeQUIC()
	for {
		conn, err := s.quicLn.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept quic: %w", err)
		}
		g.Go(func() error {
			s.handleQUIC(ctx, conn)
			return nil
		})
	}
}

// admitted is the context key of a QUIC connection's handshake token.
type admitted struct{}

// admit is quic-go's ConnContext: it takes a handshake token for a new
// connection, or refuses the connection when MaxHandshakes are taken. The
// token is given back when the session's hello is done (handleQUIC) or
// when the connection ends before that (a failed handshake).
func (s *Server) admit(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
	if s.handshakes == nil {
		return ctx, nil
	}
	select {
	case s.handshakes <- struct{}{}:
	default:
		err := fmt.Errorf("%w: %d handshakes in flight; retry after a back-off", ErrPeerRefused, cap(s.handshakes))
		s.refused(TransportQUIC, reasonBusy, info.RemoteAddr.String(), err)
		return nil, err
	}
	var once sync.Once
	release := func() { once.Do(func() { <-s.handshakes }) }
	context.AfterFunc(ctx, release)
	return context.WithValue(ctx, admitted{}, release), nil
}

// admitDone gives back conn's handshake token, if it holds one.
func admitDone(conn *quic.Conn) {
	if release, ok := conn.Context().Value(admitted{}).(func()); ok {
		release()
	}
}

func (s *Server) handleQUIC(ctx context.Context, conn *quic.Conn) {
	remote := conn.RemoteAddr().String()
	certs := conn.ConnectionState().TLS.PeerCertificates
	if len(certs) == 0 { // cannot happen: VerifyConnection requires one
		_ = conn.CloseWithError(quicCodeRefused, "no client certificate")
		return
	}
	peer := identityOf(certs[0])
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	ctrl, err := conn.AcceptStream(hctx)
	cancel()
	if err != nil {
		s.refused(TransportQUIC, reasonTimeout, remote, fmt.Errorf("no control stream: %w", err))
		_ = conn.CloseWithError(quicCodeRefused, "no control stream before the handshake deadline")
		return
	}
	l := newQUICLink(conn, ctrl, s.codec, s.cfg.LargeMessageTimeout)
	id := newSessionID()
	_, err = serverHello(l, s.codec, peer, id, time.Now().Add(s.cfg.HandshakeTimeout))
	admitDone(conn) // the handshake is over, whichever way (a closed connection gives it back too)
	if err != nil {
		s.handshakeFailed(TransportQUIC, remote, err)
		_ = conn.CloseWithError(quicCodeRefused, err.Error())
		return
	}
	sess := newSession(id, peer, TransportQUIC, l, s.sessCfg)
	sess.resumed = conn.ConnectionState().TLS.DidResume
	s.serve(ctx, sess)
}

func (s *Server) handshakeFailed(t Transport, remote string, err error) {
	var r *refusal
	if errors.As(err, &r) {
		s.refused(t, r.reason, remote, err)
		return
	}
	s.refused(t, reasonHello, remote, err)
}

// serve runs the handler on an established session and closes it after.
func (s *Server) serve(ctx context.Context, sess *Session) {
	sess.start()
	s.metrics.SessionsOpened.WithLabelValues(string(sess.transport)).Inc()
	if sess.resumed {
		s.metrics.Resumptions.WithLabelValues(string(sess.transport), ticketResumed).Inc()
	}
	sess.log().Info("session established", "resumed", sess.resumed)
	s.cfg.Handler.Handle(ctx, sess)
	_ = sess.Close("session handler returned")
}
