package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/quic-go/quic-go"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/ratelog"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	Options
	// Servers are the cloud addresses (CloudCore replicas, or one load
	// balancer) to try, in order: a pass starts at the one that worked
	// last, and after a session ends Run starts at the next one. "host:port" tries
	// QUIC on UDP and then WebSocket over TLS on TCP at the same port;
	// "quic://host:port" and "wss://host:port" try only that transport.
	// Required.
	Servers []string
	// Node is this edge node's name; it must match the client certificate.
	// Required.
	Node string
	// Agent names the client software in the hello. Default "tether".
	Agent string
	// TLS holds the client certificate and the CA that signs the server's
	// certificate (RootCAs). TLS 1.3 is enforced. Required.
	TLS *tls.Config
	// DialTimeout bounds one attempt on one transport, hello included.
	// Default 5s.
	DialTimeout time.Duration
	// Backoff sets the reconnect delays of Run. Default 500ms to 8s.
	Backoff Backoff
	// RaceDelay is how long the first transport tried at a "host:port"
	// server has to establish its session before the other transport is
	// started beside it (happy eyeballs, as RFC 8305 races address
	// families): the first session established wins, and the other
	// attempt is cancelled, or its session closed. The other transport
	// also starts at once when the first one fails. Default 250ms;
	// negative: no race, the other transport is tried only after the
	// first one failed.
	RaceDelay time.Duration
	// Prefer is the transport tried first at a "host:port" server.
	// Default QUIC. Once a session is established, its transport is
	// tried first from then on (see Client.Preferred).
	Prefer Transport
	// Tickets, when set, keeps the TLS session tickets the cloud issues
	// across restarts of the client, so that the first connection after a
	// restart resumes too (see resume.go; what it holds is as sensitive as
	// the node's private key, for the tickets' lifetime). Default: tickets
	// are kept in memory only, for the client's life.
	Tickets TicketStore
}

// endpoint is one way to reach the cloud.
type endpoint struct {
	transport Transport
	addr      string // host:port
}

// server is one entry of ClientConfig.Servers: an address and the
// transports it may be reached by (one, or QUIC and WebSocket).
type server struct {
	addr       string
	transports []Transport
}

// Client dials the cloud, falling over between addresses and transports.
type Client struct {
	cfg     ClientConfig
	codec   *message.Codec
	metrics *Metrics
	logger  *slog.Logger
	sessCfg sessionConfig
	servers []server

	// ignoreGoodbye makes the client's sessions deliver goodbyes like
	// other messages, as a build older than them does (tests).
	ignoreGoodbye bool
	// tickets holds the session tickets per transport
	// (tls.Config.ClientSessionCache).
	tickets map[Transport]*ticketCache

	mu   sync.Mutex
	last int       // index of the server that worked last
	pref Transport // the transport tried first at a server that has both
}

// NewClient validates cfg and returns a client.
func NewClient(cfg ClientConfig) (*Client, error) {
	opts, err := cfg.Options.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("tunnel client config: %w", err)
	}
	cfg.Options = opts
	if cfg.TLS == nil {
		return nil, errors.New("tunnel client config: TLS is required")
	}
	if cfg.Node == "" {
		return nil, errors.New("tunnel client config: Node is required")
	}
	if cfg.Agent == "" {
		cfg.Agent = "tether"
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.RaceDelay == 0 {
		cfg.RaceDelay = 250 * time.Millisecond
	}
	switch cfg.Prefer {
	case "":
		cfg.Prefer = TransportQUIC
	case TransportQUIC, TransportWebSocket:
	default:
		return nil, fmt.Errorf("tunnel client config: unknown transport %q to prefer", cfg.Prefer)
	}
	var servers []server
	for _, s := range cfg.Servers {
		var sv server
		switch {
		case strings.HasPrefix(s, "quic://"):
			sv = server{strings.TrimPrefix(s, "quic://"), []Transport{TransportQUIC}}
		case strings.HasPrefix(s, "wss://"):
			sv = server{strings.TrimPrefix(s, "wss://"), []Transport{TransportWebSocket}}
		case strings.Contains(s, "://"):
			return nil, fmt.Errorf("tunnel client config: server %q: unknown scheme", s)
		default:
			sv = server{s, []Transport{TransportQUIC, TransportWebSocket}}
		}
		if _, _, err := net.SplitHostPort(sv.addr); err != nil {
			return nil, fmt.Errorf("tunnel client config: server %q: %w", sv.addr, err)
		}
		servers = append(servers, sv)
	}
	if len(servers) == 0 {
		return nil, errors.New("tunnel client config: no servers")
	}
	metrics, err := newMetrics(opts.Registerer, "client")
	if err != nil {
		return nil, fmt.Errorf("tunnel client: %w", err)
	}
	codec := message.NewCodec(opts.MaxFrame)
	logger := opts.Logger.With("component", "tunnel_client", "node", cfg.Node)
	cert := clientCertificate(cfg.TLS)
	tickets := make(map[Transport]*ticketCache, 2)
	for _, t := range []Transport{TransportQUIC, TransportWebSocket} {
		tickets[t] = newTicketCache(t, cfg.Tickets, cert, logger)
	}
	sessCfg := opts.sessionConfig(codec, metrics, ratelog.New(0, nil))
	sessCfg.logger = logger // a client's sessions log with its node (Session.log)
	return &Client{
		tickets: tickets,
		cfg:     cfg,
		codec:   codec,
		metrics: metrics,
		logger:  logger,
		sessCfg: sessCfg,
		servers: servers,
		pref:    cfg.Prefer,
	}, nil
}

// Metrics returns the client's counters.
func (c *Client) Metrics() *Metrics { return c.metrics }

// clientCertificate returns a function that returns the DER of the
// certificate the client presents now, or nil when it has none.
func clientCertificate(cfg *tls.Config) func() []byte {
	return func() []byte {
		var cert *tls.Certificate
		switch {
		case cfg.GetClientCertificate != nil:
			cert, _ = cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
		case len(cfg.Certificates) > 0:
			cert = &cfg.Certificates[0]
		}
		if cert == nil || len(cert.Certificate) == 0 {
			return nil
		}
		return cert.Certificate[0]
	}
}

// serverName is the TLS server name for addr (and the key of its ticket).
func (c *Client) serverName(addr string) string {
	if c.cfg.TLS.ServerName != "" {
		return c.cfg.TLS.ServerName
	}
	host, _, _ := net.SplitHostPort(addr)
	return host
}

func (c *Client) tlsConfig(t Transport, addr string) *tls.Config {
	cfg := c.cfg.TLS.Clone()
	cfg.MinVersion = tls.VersionTLS13
	cfg.ServerName = c.serverName(addr)
	cfg.ClientSessionCache = c.tickets[t]
	if _, ok := c.tickets[t].Get(cfg.ServerName); ok && len(cfg.CurvePreferences) == 0 {
		cfg.CurvePreferences = []tls.CurveID{tls.X25519} // see resume.go
	}
	// The transport's protocols (on QUIC alpnQUICAnnounced first, quic.go),
	// and alpnKeepTicket, never negotiated, which says that this client
	// keeps its ticket when the server asks (ticket.go).
	if t == TransportQUIC {
		cfg.NextProtos = append(quicProtos(c.cfg.Options), alpnKeepTicket)
	} else {
		cfg.NextProtos = []string{"http/1.1", alpnKeepTicket}
	}
	return cfg
}

func (c *Client) dialQUIC(ctx context.Context, ep endpoint, deadline time.Time) (*Session, error) {
	conn, err := quic.DialAddr(ctx, ep.addr, c.tlsConfig(TransportQUIC, ep.addr),
		quicConfig(c.cfg.Options, c.cfg.DialTimeout))
	if err != nil {
		return nil, fmt.Errorf("quic handshake: %w", err)
	}
	ctrl, err := conn.OpenStreamSync(ctx)
	if err != nil {
		_ = conn.CloseWithError(quicCodeClosed, "")
		return nil, fmt.Errorf("open control stream: %w", err)
	}
	l := newQUICLink(conn, ctrl, c.codec, c.cfg.LargeMessageTimeout)
	ack, err := clientHello(ctx, l, c.codec, c.cfg.Node, c.cfg.Agent, deadline)
	if err != nil {
		var appErr *quic.ApplicationError
		if errors.As(err, &appErr) && appErr.Remote && appErr.ErrorCode == quicCodeRefused {
			err = &RefusedError{Reason: appErr.ErrorMessage}
		}
		_ = conn.CloseWithError(quicCodeClosed, "hello failed")
		return nil, err
	}
	sess := newSession(ack.Session, c.serverIdentity(conn.ConnectionState().TLS), TransportQUIC, l, c.sessCfg)
	sess.resumed, sess.curve = conn.ConnectionState().TLS.DidResume, conn.ConnectionState().TLS.CurveID
	c.started(sess)
	return sess, nil
}

func (c *Client) dialWebSocket(ctx context.Context, ep endpoint, deadline time.Time) (*Session, error) {
	d := &websocket.Dialer{
		TLSClientConfig:  c.tlsConfig(TransportWebSocket, ep.addr),
		HandshakeTimeout: c.cfg.DialTimeout,
		ReadBufferSize:   4096,
		WriteBufferSize:  64 << 10, // borrowed from the pool while writing only
		WriteBufferPool:  &sync.Pool{},
	}
	u := url.URL{Scheme: "wss", Host: ep.addr, Path: wsSessionPath}
	conn, resp, err := d.DialContext(ctx, u.String(), nil)
	if resp != nil && resp.Body != nil {
		_ = resp.Body.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("websocket handshake: %w", err)
	}
	streams := &wsClientStreams{dialer: d, addr: ep.addr, incoming: make(chan Stream, 4)}
	l := newWSLink(conn, c.codec, c.cfg.KeepAlive, c.cfg.DeadPeerTimeout, streams)
	ack, err := clientHello(ctx, l, c.codec, c.cfg.Node, c.cfg.Agent, deadline)
	if err != nil {
		var ce *websocket.CloseError
		if errors.As(err, &ce) {
			err = &RefusedError{Reason: ce.Text}
		}
		_ = conn.Close()
		return nil, err
	}
	streams.session = ack.Session
	cs := conn.UnderlyingConn().(*tls.Conn).ConnectionState()
	sess := newSession(ack.Session, c.serverIdentity(cs), TransportWebSocket, l, c.sessCfg)
	sess.resumed, sess.curve = cs.DidResume, cs.CurveID
	streams.done = sess.ctx.Done()
	c.started(sess)
	return sess, nil
}

func (c *Client) serverIdentity(cs tls.ConnectionState) Identity {
	if len(cs.PeerCertificates) == 0 {
		return Identity{}
	}
	id := identityOf(cs.PeerCertificates[0])
	id.Node = ""
	return id
}

func (c *Client) started(sess *Session) {
	sess.goodbye.take = !c.ignoreGoodbye
	sess.start()
	c.metrics.SessionsOpened.WithLabelValues(string(sess.transport)).Inc()
	if sess.resumed {
		c.metrics.Resumptions.WithLabelValues(string(sess.transport), ticketResumed).Inc()
	}
	sess.log().Info("connected to cloud", "resumed", sess.resumed)
}

// Run keeps a session to the cloud until ctx ends: it dials, calls handle
// with the session, and when the session ends or a dial fails it waits a
// jittered, growing delay before trying again. handle's error is logged and
// does not stop Run.
func (c *Client) Run(ctx context.Context, handle func(ctx context.Context, s *Session) error) error {
	b := c.cfg.Backoff
	for {
		sess, err := c.Dial(ctx)
		if err == nil {
			b.Reset()
			stop := context.AfterFunc(ctx, func() { _ = sess.Close("client stopping") })
			herr := handle(ctx, sess)
			stop()
			_ = sess.Close("client handler returned")
			c.logger.Info("disconnected from cloud", "reason", sess.Err(), "handler_err", herr)
			if hint := sess.Hint(); hint == "" || !c.startAt(hint) {
				c.moveOn()
			}
		} else if ctx.Err() == nil {
			c.logger.Warn("cannot reach cloud", "err", err)
		}
		if ctx.Err() != nil {
			return nil
		}
		t := time.NewTimer(b.Next())
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// moveOn makes the next pass start at the server after the one whose
// session just ended: that replica is the likeliest to be gone (killed,
// restarting, or overloaded), and the next one in the list is as good as
// any other while it may still be dead, which costs a whole DialTimeout
// to find out. With one server it changes nothing.
func (c *Client) moveOn() {
	c.mu.Lock()
	c.last = (c.last + 1) % len(c.servers)
	c.mu.Unlock()
}

// wsClientStreams opens bulk streams as new WebSocket connections to the
// server, naming the session they belong to.
type wsClientStreams struct {
	dialer   *websocket.Dialer
	addr     string
	session  string
	incoming chan Stream
	done     <-chan struct{}
}

func (w *wsClientStreams) dial(ctx context.Context, token string) (Stream, error) {
	q := url.Values{"session": {w.session}}
	if token != "" {
		q.Set("token", token)
	}
	u := url.URL{Scheme: "wss", Host: w.addr, Path: wsStreamPath, RawQuery: q.Encode()}
	conn, resp, err := w.dialer.DialContext(ctx, u.String(), nil)
	if resp != nil && resp.Body != nil {
		_ = resp.Body.Close()
	}
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("dial stream: %w (HTTP %d)", err, resp.StatusCode)
		}
		return nil, fmt.Errorf("dial stream: %w", err)
	}
	conn.SetReadLimit(-1)
	return &wsStream{conn: conn}, nil
}

func (w *wsClientStreams) open(ctx context.Context) (Stream, error) { return w.dial(ctx, "") }

func (w *wsClientStreams) accept(ctx context.Context) (Stream, error) {
	select {
	case st := <-w.incoming:
		return st, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-w.done:
		return nil, ErrSessionClosed
	}
}

// control answers the server's request for a stream by dialling it.
func (w *wsClientStreams) control(ctx context.Context, g spawner, m *message.Message) error {
	token := string(m.Payload)
	g.Go(func() error {
		st, err := w.dial(ctx, token)
		if err != nil {
			return nil //nolint:nilerr // a failed stream is the opener's error (it times out), not the session's
		}
		select {
		case w.incoming <- st:
		case <-ctx.Done():
			_ = st.Close()
		}
		return nil
	})
	return nil
}
