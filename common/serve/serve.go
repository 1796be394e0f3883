// Package serve is a daemon's operations endpoint: an HTTP server with
// Prometheus metrics (/metrics) and health checks (/healthz, /livez,
// /readyz), shaped like kube-apiserver's. It knows nothing of either
// daemon: the checks are functions the caller names. It must not serve
// anything that changes state.
package serve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one named health check. Func returns nil when healthy; its
// error is shown to the caller of /readyz?verbose.
type Check struct {
	Name string
	Func func(ctx context.Context) error
}

// Config configures a Server. Zero values mean the defaults beside each
// field.
type Config struct {
	// Addr is the TCP address to listen on, such as 127.0.0.1:10350.
	// Required; host and port must both be given (":10350" would serve
	// every interface, so it is refused: write 0.0.0.0:10350 to mean it).
	Addr string
	// Gatherer is served on /metrics. Default: an empty registry.
	Gatherer prometheus.Gatherer
	// Ready are the checks of /readyz. Default none: ready once serving.
	Ready []Check
	// Live are the checks of /livez and /healthz. Default none: live
	// while the process serves.
	Live []Check
	// CheckTimeout bounds each check. Default 5s.
	CheckTimeout time.Duration
	// ShutdownTimeout bounds the graceful shutdown when Run's ctx ends.
	// Default 5s.
	ShutdownTimeout time.Duration
	// Logger defaults to a discard logger.
	Logger *slog.Logger
}

// Server serves the operations endpoints. New binds the address; Run
// serves until its ctx ends.
type Server struct {
	cfg Config
	ln  net.Listener
	srv *http.Server
}

// New validates cfg and binds cfg.Addr, so a bad or busy address is
// refused here rather than after the daemon started.
func New(cfg Config) (*Server, error) {
	host, port, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("serve: parse address %q: %w", cfg.Addr, err)
	}
	if host == "" || port == "" {
		return nil, fmt.Errorf("serve: address %q: host and port are both required", cfg.Addr)
	}
	for _, c := range append(append([]Check(nil), cfg.Ready...), cfg.Live...) {
		if c.Name == "" || c.Func == nil || strings.ContainsAny(c.Name, "/ \n") {
			return nil, fmt.Errorf("serve: check %q: a name without '/' or spaces and a func are required", c.Name)
		}
	}
	if cfg.Gatherer == nil {
		cfg.Gatherer = prometheus.NewRegistry()
	}
	if cfg.CheckTimeout <= 0 {
		cfg.CheckTimeout = 5 * time.Second
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("serve: listen on %s: %w", cfg.Addr, err)
	}
	s := &Server{cfg: cfg, ln: ln}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(cfg.Gatherer, promhttp.HandlerOpts{}))
	mux.Handle("/healthz", s.checks("healthz", cfg.Live))
	mux.Handle("/livez", s.checks("livez", cfg.Live))
	mux.Handle("/readyz", s.checks("readyz", cfg.Ready))
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Run serves until ctx ends, then shuts down gracefully and returns once
// every connection is done (nil) or the shutdown timed out.
func (s *Server) Run(ctx context.Context) error {
	done := make(chan error, 1)
	go func() { done <- s.srv.Serve(s.ln) }()
	select {
	case err := <-done:
		return fmt.Errorf("serve operations endpoint: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	err := s.srv.Shutdown(sctx)
	if serr := <-done; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	if err != nil {
		_ = s.srv.Close()
		return fmt.Errorf("shut down operations endpoint: %w", err)
	}
	return nil
}

// Close releases the listener of a Server whose Run was never called; after
// Run returned it does nothing.
func (s *Server) Close() error {
	if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("close operations listener: %w", err)
	}
	return nil
}

// Disabled says whether a daemon's configured address turns the endpoint
// off: "" or "0".
func Disabled(addr string) bool { return addr == "" || addr == "0" }

// GathererOf is reg's own Gatherer when it has one (a *prometheus.Registry
// does), so /metrics serves what the daemon registered; otherwise (nil
// included) an empty registry.
func GathererOf(reg prometheus.Registerer) prometheus.Gatherer {
	if g, ok := reg.(prometheus.Gatherer); ok {
		return g
	}
	return prometheus.NewRegistry()
}

// checks serves one health endpoint as kube-apiserver does: 200 "ok" when
// every check passes, 500 otherwise; with ?verbose, one line per check
// ("[+]name ok" or "[-]name failed: reason"); ?exclude=name skips a check.
func (s *Server) checks(endpoint string, checks []Check) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		_, verbose := q["verbose"]
		excluded := map[string]bool{}
		for _, n := range q["exclude"] {
			excluded[n] = true
		}
		var b strings.Builder
		failed := false
		for _, c := range checks {
			if excluded[c.Name] {
				fmt.Fprintf(&b, "[+]%s excluded: ok\n", c.Name)
				continue
			}
			ctx, cancel := context.WithTimeout(r.Context(), s.cfg.CheckTimeout)
			err := c.Func(ctx)
			cancel()
			if err != nil {
				failed = true
				fmt.Fprintf(&b, "[-]%s failed: %v\n", c.Name, err)
				continue
			}
			fmt.Fprintf(&b, "[+]%s ok\n", c.Name)
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if failed {
			s.cfg.Logger.Debug("health check failed", "endpoint", endpoint, "checks", b.String())
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = io.WriteString(w, b.String())
			fmt.Fprintf(w, "%s check failed\n", endpoint)
			return
		}
		if verbose {
			_, _ = io.WriteString(w, b.String())
			fmt.Fprintf(w, "%s check passed\n", endpoint)
			return
		}
		_, _ = io.WriteString(w, "ok")
	})
}

// NewRegistry returns a registry holding the Go runtime's and the
// process's collectors (go_*, process_*), for a daemon's own metrics.
func NewRegistry() (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	if err := reg.Register(collectors.NewGoCollector()); err != nil {
		return nil, fmt.Errorf("register go collector: %w", err)
	}
	if err := reg.Register(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})); err != nil {
		return nil, fmt.Errorf("register process collector: %w", err)
	}
	return reg, nil
}
