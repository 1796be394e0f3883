package cri

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/ratelog"
)

// maxMsgSize is the largest request or response: kubelet's and
// cri-client's limit, so that a node with many containers can list them.
const maxMsgSize = 16 << 20

// stopGrace is how long Run waits for calls in flight once ctx ends
// before it cuts them off.
const stopGrace = 5 * time.Second

// Server is the CRI shim. Build it with New and serve with Run, or
// register it on a grpc.Server of your own with Register.
type Server struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	runtimeapi.UnimplementedImageServiceServer

	cfg     Config
	route   *router
	logger  *slog.Logger
	lim     *ratelog.Limiter
	calls   *prometheus.CounterVec
	latency *prometheus.HistogramVec
}

// New builds a shim over the backends, routing ids through ids. It does
// not listen: Run does.
func New(cfg Config, backends Backends, ids IDMap) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if backends.Default == nil {
		return nil, errors.New("cri: the default backend is required")
	}
	if ids == nil {
		return nil, errors.New("cri: an id map is required")
	}
	s := &Server{
		cfg:    cfg,
		route:  &router{handlers: cfg.Handlers, vmHandler: cfg.VMHandler, backends: backends, ids: newIDCache(ids)},
		logger: cfg.Logger.With("component", "cri"),
		lim:    ratelog.New(0, nil),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_cri_calls_total",
			Help: "CRI calls served by the shim, by method and gRPC code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tether_cri_call_seconds",
			Help:    "Time the shim took to serve a CRI call, backend included, by method.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"method"}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{s.calls, s.latency} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register cri metrics: %w", err)
			}
		}
	}
	return s, nil
}

// Register registers the shim's services on g.
func (s *Server) Register(g *grpc.Server) {
	runtimeapi.RegisterRuntimeServiceServer(g, s)
	runtimeapi.RegisterImageServiceServer(g, s)
}

// NewGRPCServer returns a grpc.Server with the shim's services and
// interceptors (deadlines, status codes, metrics).
func (s *Server) NewGRPCServer() *grpc.Server {
	g := grpc.NewServer(
		grpc.MaxRecvMsgSize(maxMsgSize), grpc.MaxSendMsgSize(maxMsgSize),
		grpc.UnaryInterceptor(s.unary), grpc.StreamInterceptor(s.stream),
	)
	s.Register(g)
	return g
}

// Run serves on the unix socket cfg.Listen until ctx ends, then lets calls
// in flight finish (for up to 5 s) and removes the socket. A stale socket
// file left by a killed process is replaced; any other file there is an
// error.
func (s *Server) Run(ctx context.Context) error {
	if s.cfg.Listen == "" {
		return errors.New("cri: no listen socket configured")
	}
	lis, err := listenUnix(s.cfg.Listen)
	if err != nil {
		return err
	}
	g := s.NewGRPCServer()
	s.logger.Info("cri shim serving", "socket", s.cfg.Listen, "handlers", s.cfg.Handlers, "vm_handler", s.cfg.VMHandler)
	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error {
		// A ctx that ends before Serve starts stops the server first: Serve
		// then closes lis and returns ErrServerStopped, a clean end.
		if err := g.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("serve cri: %w", err)
		}
		return nil
	})
	eg.Go(func() error {
		<-ctx.Done()
		stopped := make(chan struct{})
		eg.Go(func() error { g.GracefulStop(); close(stopped); return nil })
		t := time.NewTimer(stopGrace)
		defer t.Stop()
		select {
		case <-stopped:
		case <-t.C:
			g.Stop()
		}
		return nil
	})
	err = eg.Wait()
	if rmErr := os.Remove(s.cfg.Listen); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) {
		err = errors.Join(err, fmt.Errorf("remove cri socket: %w", rmErr))
	}
	return err
}

func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("create cri socket directory: %w", err)
	}
	if info, err := os.Lstat(path); err == nil {
		if info.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("listen cri %s: a file that is not a socket is in the way", path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			_ = c.Close()
			return nil, fmt.Errorf("listen cri %s: another process serves it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale cri socket: %w", err)
		}
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen cri: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		return nil, errors.Join(fmt.Errorf("chmod cri socket: %w", err), lis.Close())
	}
	return lis, nil
}

// timeoutOf is the deadline of a call: PullImage gets PullTimeout;
// ExecSync and StopContainer their own timeout (the exec's, the grace
// period before SIGKILL) on top of CallTimeout, as kubelet's CRI client
// bounds them; every other call CallTimeout. context.WithTimeout keeps a
// shorter deadline of the caller.
func (s *Server) timeoutOf(method string, req any) time.Duration {
	switch r := req.(type) {
	case *runtimeapi.PullImageRequest:
		return s.cfg.PullTimeout
	case *runtimeapi.ExecSyncRequest:
		return s.cfg.CallTimeout + time.Duration(max(r.GetTimeout(), 0))*time.Second
	case *runtimeapi.StopContainerRequest:
		return s.cfg.CallTimeout + time.Duration(max(r.GetTimeout(), 0))*time.Second
	}
	_ = method
	return s.cfg.CallTimeout
}

// unary bounds every call, keeps the backend's gRPC status code, and
// counts and times the call. cri-client logs through klog: its logger is
// discarded, and the shim logs failures itself, rate-limited.
func (s *Server) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
	ctx, cancel := context.WithTimeout(klog.NewContext(ctx, logr.Discard()), s.timeoutOf(method, req))
	defer cancel()
	start := time.Now()
	resp, err := handler(ctx, req)
	err = toStatus(ctx, err)
	code := status.Code(err)
	s.calls.WithLabelValues(method, code.String()).Inc()
	s.latency.WithLabelValues(method).Observe(time.Since(start).Seconds())
	if err != nil && code != codes.NotFound {
		if ok, suppressed := s.lim.Allow(method + "/" + code.String()); ok {
			s.logger.Warn("cri call failed", "method", method, "code", code.String(), "err", err, "suppressed", suppressed)
		}
	}
	return resp, err
}

func (s *Server) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
	err := toStatus(ss.Context(), handler(srv, ss))
	s.calls.WithLabelValues(method, status.Code(err).String()).Inc()
	return err
}

// toStatus gives err a gRPC status: the backend's code, kept through
// cri-client's and the shim's wrapping, or the context's, or Unknown.
func toStatus(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	var se interface {
		error
		GRPCStatus() *status.Status
	}
	if errors.As(err, &se) {
		st := se.GRPCStatus()
		if st.Code() == codes.OK {
			return nil
		}
		if se == err { //nolint:errorlint // identity: is err the status itself, unwrapped?
			return err
		}
		// Wrapped: keep the wrapping's words and the status's message,
		// not "rpc error: code = ... desc =" twice.
		prefix := strings.TrimSuffix(err.Error(), se.Error())
		return status.Error(st.Code(), prefix+st.Message())
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case ctx.Err() != nil:
		return status.FromContextError(ctx.Err()).Err()
	}
	return status.Error(codes.Unknown, err.Error())
}

// invalid is the error of a request that lacks a required field.
func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}
