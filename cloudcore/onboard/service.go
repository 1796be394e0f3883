package onboard

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"
	"golang.org/x/time/rate"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/common/join"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/common/ratelog"
)

// DefaultAddr is where the join endpoint listens unless told otherwise.
const DefaultAddr = ":10002"

// MaxRequestBytes bounds the body of a join request.
const MaxRequestBytes = 64 << 10

const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 16 << 10
	// joinTimeout bounds the API requests of one join.
	joinTimeout = 30 * time.Second
	// shutdownTimeout bounds how long Run waits for joins in flight once
	// its context ends.
	shutdownTimeout = 10 * time.Second
)

// Config configures the join endpoint.
type Config struct {
	// Addr is the TCP address to listen on. Empty means DefaultAddr.
	Addr string
	// TLS holds the server certificate (Certificates or GetCertificate),
	// which joining nodes check against the CA their token names. Required.
	// The service uses a copy with TLS 1.3 as the minimum and no client
	// certificate asked for: a joining node has none yet.
	TLS *tls.Config
	// EdgeNodes is the whitelist. Required. Give it a Kubernetes client of
	// its own (DefaultClientQPS): joins then never take API capacity from
	// the edges' sessions, and a flood of joins is bounded by that
	// client's rate as well as by SourceRate.
	EdgeNodes *edgenode.Client
	// Issuer signs the node certificates. Required.
	Issuer *Issuer
	// SourceRate and SourceBurst limit the join requests of one source
	// address (an IPv4 address or an IPv6 /64): beyond them a request is
	// refused with 429 before it is read or costs an API request. Zero
	// means DefaultSourceRate and DefaultSourceBurst.
	SourceRate  rate.Limit
	SourceBurst int
	// MaxSources bounds the sources remembered for SourceRate. Zero means
	// DefaultMaxSources.
	MaxSources int
	// MaxConns caps the connections served at once; more wait to be
	// accepted. Zero means DefaultMaxConns.
	MaxConns int
	// Now is the clock for token expiry and the rate limits. Nil means
	// time.Now.
	Now func() time.Time
	// Logger receives the service's logs. Nil discards them.
	Logger *slog.Logger
	// Registerer receives the service's metrics. Nil registers them
	// nowhere.
	Registerer prometheus.Registerer
}

// Service is the join endpoint: HTTPS, server-authenticated only.
type Service struct {
	cfg     Config
	logger  *slog.Logger
	metrics *metrics
	caPEM   []byte
	caHash  string
	srv     *http.Server
	sources *sourceLimiter
	logLim  *ratelog.Limiter

	mu sync.Mutex
	ln net.Listener
}

// New checks cfg and builds the service; it does not listen yet.
func New(cfg Config) (*Service, error) {
	if cfg.Addr == "" {
		cfg.Addr = DefaultAddr
	}
	if cfg.TLS == nil || (len(cfg.TLS.Certificates) == 0 && cfg.TLS.GetCertificate == nil && cfg.TLS.GetConfigForClient == nil) {
		return nil, errors.New("join service: a TLS server certificate is required")
	}
	if cfg.EdgeNodes == nil {
		return nil, errors.New("join service: EdgeNodes is required")
	}
	if cfg.Issuer == nil || cfg.Issuer.CA == nil || cfg.Issuer.CA.Cert == nil || cfg.Issuer.CA.Key == nil {
		return nil, errors.New("join service: an Issuer with a CA is required")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.SourceRate == 0 {
		cfg.SourceRate = DefaultSourceRate
	}
	if cfg.SourceBurst == 0 {
		cfg.SourceBurst = DefaultSourceBurst
	}
	if cfg.MaxSources == 0 {
		cfg.MaxSources = DefaultMaxSources
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.SourceRate < 0 || cfg.SourceBurst < 0 || cfg.MaxSources < 0 || cfg.MaxConns < 0 {
		return nil, errors.New("join service: negative limits")
	}
	tlsCfg := cfg.TLS.Clone()
	tlsCfg.MinVersion = tls.VersionTLS13
	tlsCfg.ClientAuth = tls.NoClientCert
	cfg.TLS = tlsCfg

	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	logger := cfg.Logger.With("component", "join")
	s := &Service{
		cfg:     cfg,
		logger:  logger,
		metrics: m,
		caPEM:   pki.EncodeCert(cfg.Issuer.CA.Cert),
		caHash:  join.CAHash(cfg.Issuer.CA.Cert),
		sources: newSourceLimiter(cfg.SourceRate, cfg.SourceBurst, cfg.MaxSources),
		logLim:  ratelog.New(0, nil),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+join.PathCA, s.serveCA)
	mux.HandleFunc("POST "+join.PathJoin, s.serveJoin)
	s.srv = &http.Server{
		Handler:           mux,
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		// TLS handshake failures of scanners are not worth more than debug.
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
	return s, nil
}

// Listen binds the address, so that Addr is known before Run. Run calls it
// when it has not been called.
func (s *Service) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("join service: listen on %s: %w", s.cfg.Addr, err)
	}
	s.ln = netutil.LimitListener(ln, s.cfg.MaxConns)
	return nil
}

// Addr is the bound address, or nil before Listen.
func (s *Service) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Run serves until ctx ends, then stops accepting, lets the joins in flight
// finish (for a bounded time) and returns. It returns nil when ctx ended.
func (s *Service) Run(ctx context.Context) error {
	if err := s.Listen(); err != nil {
		return err
	}
	s.mu.Lock()
	ln := s.ln
	s.mu.Unlock()
	s.logger.Info("join service listening", "addr", ln.Addr().String(), "ca_hash", "sha256:"+s.caHash)

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		// The certificate is in TLSConfig, so no files are named.
		if err := s.srv.ServeTLS(ln, "", ""); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("join service: serve: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
		defer cancel()
		if err := s.srv.Shutdown(sctx); err != nil {
			// Joins still running after the grace period are cut off.
			_ = s.srv.Close()
			return fmt.Errorf("join service: shut down: %w", err)
		}
		return nil
	})
	return g.Wait()
}

func (s *Service) serveCA(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/x-pem-file")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(s.caPEM)
}

func (s *Service) serveJoin(w http.ResponseWriter, r *http.Request) {
	remote := r.RemoteAddr
	if !s.sources.allow(remote, s.cfg.Now()) {
		// Answered before the body is read and before any API request.
		w.Header().Set("Retry-After", "1")
		s.refuse(w, "", remote, refused(http.StatusTooManyRequests, reasonRateLimited,
			"too many join requests from this address; try again later"))
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, MaxRequestBytes)
	body, err := io.ReadAll(r.Body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			s.refuse(w, "", remote, refused(http.StatusRequestEntityTooLarge, reasonMalformedRequest,
				fmt.Sprintf("request larger than %d bytes", MaxRequestBytes)))
			return
		}
		s.refuse(w, "", remote, refused(http.StatusBadRequest, reasonMalformedRequest, "cannot read the request"))
		return
	}
	var req join.Request
	if err := json.Unmarshal(body, &req); err != nil {
		s.refuse(w, "", remote, refused(http.StatusBadRequest, reasonMalformedRequest, "malformed request: not a JSON join request"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), joinTimeout)
	defer cancel()
	cert, err := s.join(ctx, req)
	if err != nil {
		s.refuse(w, req.Node, remote, err)
		return
	}
	s.metrics.joined.Inc()
	s.logger.Info("node joined", "node", req.Node, "serial", cert.SerialNumber.Text(16),
		"not_after", cert.NotAfter, "remote", remote)
	writeJSON(w, http.StatusOK, join.Response{Certificate: string(pki.EncodeCert(cert)), CA: string(s.caPEM)})
}

// refuse answers a failed join: a refusal with its own status and
// sentence, anything else as an internal error whose details stay in the
// log.
func (s *Service) refuse(w http.ResponseWriter, node, remote string, err error) {
	var r *refusal
	if !errors.As(err, &r) {
		s.metrics.failed.Inc()
		s.logger.Error("join failed", "node", node, "remote", remote, "err", err)
		writeJSON(w, http.StatusInternalServerError, join.Response{Error: "internal error; the cloud's log has the details"})
		return
	}
	s.metrics.refused.WithLabelValues(r.reason).Inc()
	// Anyone can make refusals: one log line per reason and minute.
	if ok, suppressed := s.logLim.Allow(r.reason); ok {
		s.logger.Warn("join refused", "node", node, "reason", r.reason, "detail", r.msg, "remote", remote, "suppressed", suppressed)
	}
	writeJSON(w, r.status, join.Response{Error: r.msg})
}

func writeJSON(w http.ResponseWriter, status int, v join.Response) {
	b, err := json.Marshal(v)
	if err != nil {
		// A Response is three strings: this cannot happen.
		http.Error(w, "encode response", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// metrics of the join endpoint.
type metrics struct {
	joined  prometheus.Counter
	refused *prometheus.CounterVec
	failed  prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		joined: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_join_total",
			Help: "Edge nodes that joined: a token was used and a certificate issued.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_join_refused_total",
			Help: "Join requests refused, by reason.",
		}, []string{"reason"}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_join_errors_total",
			Help: "Join requests that failed on the cloud's side (API server errors).",
		}),
	}
	for _, r := range refusalReasons {
		m.refused.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.joined, m.refused, m.failed} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("join service: register metrics: %w", err)
		}
	}
	return m, nil
}
