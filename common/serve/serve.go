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
	"net/http/pprof"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tetheredge/tether/common/ratelog"
)

// Check is one named health check. Func returns nil when healthy; its
// error is shown to the caller of /readyz?verbose. Name (lowercase
// letters, digits and '-') is also its path: /readyz/Name.
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
	// Pprof also serves net/http/pprof's profiles under /debug/pprof/.
	// Default off: a profile shows what the process holds, so it is for
	// an operator investigating on a local-only endpoint.
	Pprof bool
}

// Server serves the operations endpoints. New binds the address; Run
// serves until its ctx ends.
type Server struct {
	cfg Config
	ln  net.Listener
	srv *http.Server
	lim *ratelog.Limiter // failed checks' logs
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
	for _, list := range [][]Check{cfg.Ready, cfg.Live} {
		if err := validChecks(list); err != nil {
			return nil, err
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
	s := &Server{cfg: cfg, ln: ln, lim: ratelog.New(time.Minute, nil)}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(cfg.Gatherer, promhttp.HandlerOpts{}))
	s.checks(mux, "healthz", cfg.Live)
	s.checks(mux, "livez", cfg.Live)
	s.checks(mux, "readyz", cfg.Ready)
	if cfg.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	return s, nil
}

// checkName is what a check's name may be: it is a path element.
var checkName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)

// validChecks refuses checks without a func or a valid, unique name.
func validChecks(checks []Check) error {
	seen := make(map[string]bool, len(checks))
	for _, c := range checks {
		switch {
		case !checkName.MatchString(c.Name):
			return fmt.Errorf("serve: check %q: the name must be lowercase letters, digits and '-'", c.Name)
		case c.Func == nil:
			return fmt.Errorf("serve: check %q has no func", c.Name)
		case seen[c.Name]:
			return fmt.Errorf("serve: check %q is given twice", c.Name)
		}
		seen[c.Name] = true
	}
	return nil
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
// ("[+]name ok" or "[-]name failed: reason"); ?exclude=name skips a
// check; /endpoint/name runs that check alone (404 for an unknown name).
// A failed check is logged once a minute per check, with the count of
// failures not logged since.
func (s *Server) checks(mux *http.ServeMux, endpoint string, checks []Check) {
	mux.Handle("/"+endpoint, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		_, verbose := q["verbose"]
		run := make([]Check, 0, len(checks))
		var b strings.Builder
		for _, c := range checks {
			if slices.Contains(q["exclude"], c.Name) {
				fmt.Fprintf(&b, "[+]%s excluded: ok\n", c.Name)
				continue
			}
			run = append(run, c)
		}
		failed := s.run(r.Context(), endpoint, run, &b)
		s.answer(w, endpoint, failed, verbose, b.String())
	}))
	for _, c := range checks {
		mux.Handle("/"+endpoint+"/"+c.Name, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var b strings.Builder
			failed := s.run(r.Context(), endpoint, []Check{c}, &b)
			s.answer(w, endpoint, failed, false, b.String())
		}))
	}
}

// run runs checks in order, writing one line each to b, and says whether
// any failed.
func (s *Server) run(ctx context.Context, endpoint string, checks []Check, b *strings.Builder) (failed bool) {
	for _, c := range checks {
		cctx, cancel := context.WithTimeout(ctx, s.cfg.CheckTimeout)
		err := c.Func(cctx)
		cancel()
		if err == nil {
			fmt.Fprintf(b, "[+]%s ok\n", c.Name)
			continue
		}
		failed = true
		fmt.Fprintf(b, "[-]%s failed: %v\n", c.Name, err)
		if ok, suppressed := s.lim.Allow(endpoint + "/" + c.Name); ok {
			s.cfg.Logger.Info("health check failed", "endpoint", endpoint, "check", c.Name, "err", err, "suppressed", suppressed)
		}
	}
	return failed
}

// answer writes a health endpoint's reply: the check lines when one
// failed or verbose was asked, else "ok".
func (s *Server) answer(w http.ResponseWriter, endpoint string, failed, verbose bool, lines string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	switch {
	case failed:
		w.WriteHeader(http.StatusInternalServerError)
		fmt.Fprintf(w, "%s%s check failed\n", lines, endpoint)
	case verbose:
		fmt.Fprintf(w, "%s%s check passed\n", lines, endpoint)
	default:
		_, _ = io.WriteString(w, "ok")
	}
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
