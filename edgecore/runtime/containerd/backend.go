// Package containerd is the CRI shim's backend for containers: containerd's
// CRI endpoint through k8s.io/cri-client, plus containerd's own events
// service for container starts, exits and OOM kills (containerd 1.6 has no
// CRI GetContainerEvents).
//
// It only talks to containerd: it must not import the pod manager or the
// syncer, and it keeps no state of its own beyond its connections.
package containerd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	internalapi "k8s.io/cri-api/pkg/apis"
	remote "k8s.io/cri-client/pkg"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/edgecore/cri"
)

// Config configures the backend. Zero values mean the defaults beside each
// field.
type Config struct {
	// Endpoint is containerd's socket, as unix:///run/containerd/containerd.sock
	// or a plain path. Required.
	Endpoint string
	// Timeout bounds each CRI call inside cri-client (RunPodSandbox gets
	// twice as much). The shim's own deadline is normally shorter.
	// Default 2 min.
	Timeout time.Duration
	// Namespace is the containerd namespace of the CRI plugin. Default "k8s.io".
	Namespace string
	// Backoff is the first and the largest wait before the event stream is
	// subscribed again. Defaults 100 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration
	// ExitSettle bounds how long an exit event waits for the CRI plugin to
	// record the exit (see settleExit); after it, the event is delivered
	// anyway and counted. Default 2 s.
	ExitSettle time.Duration
	// Registerer, when set, gets the backend's metrics.
	Registerer prometheus.Registerer
	// Logger defaults to a discard logger.
	Logger *slog.Logger
}

// Backend is containerd behind the shim. It implements cri.Backend and
// cri.EventSource; Run serves the event subscription.
type Backend struct {
	internalapi.RuntimeService
	internalapi.ImageManagerService

	cfg    Config
	logger *slog.Logger
	lim    *ratelog.Limiter
	events *cri.Broker
	// reconnects signals each (re)subscription of the event stream.
	reconnects reconnects
	// conn is the events service's connection (cri-client keeps its own).
	conn *grpc.ClientConn
	// exits counts exit events by how they were delivered (settled,
	// unsettled), settleWait the time each waited.
	exits      *prometheus.CounterVec
	settleWait prometheus.Histogram

	closeOnce sync.Once
	closeErr  error
}

var (
	_ cri.Backend     = (*Backend)(nil)
	_ cri.EventSource = (*Backend)(nil)
)

// New connects to containerd. It does not wait for containerd to answer:
// calls fail with Unavailable until it does.
func New(ctx context.Context, cfg Config) (*Backend, error) {
	if cfg.Endpoint == "" {
		return nil, errors.New("containerd: an endpoint is required")
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 2 * time.Minute
	}
	if cfg.Namespace == "" {
		cfg.Namespace = "k8s.io"
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 5 * time.Second
	}
	if cfg.ExitSettle == 0 {
		cfg.ExitSettle = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	exits := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_containerd_exit_events_total",
		Help: "Container and sandbox exit events by delivery: settled (the CRI plugin had recorded the exit) or unsettled (delivered after the bound without it).",
	}, []string{"delivery"})
	settleWait := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "tether_containerd_exit_settle_seconds",
		Help:    "How long exit events waited for the CRI plugin to record the exit.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 12),
	})
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{exits, settleWait} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register containerd backend metrics: %w", err)
			}
		}
	}
	// The events connection asks containerd for its version first, so
	// that cri-client connects only to a containerd that answers (see
	// cri.AskVersion).
	conn, err := grpc.NewClient(socketTarget(cfg.Endpoint), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("connect containerd events service: %w", err)
	}
	if err := cri.AskVersion(ctx, conn, min(cfg.Timeout, 10*time.Second)); err != nil {
		return nil, errors.Join(fmt.Errorf("containerd at %s: %w", cfg.Endpoint, err), conn.Close())
	}
	ctx = klog.NewContext(ctx, logr.Discard()) // cri-client logs through klog
	rt, err := remote.NewRemoteRuntimeService(ctx, cfg.Endpoint, cfg.Timeout, nil, false)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("connect containerd runtime service: %w", err), conn.Close())
	}
	img, err := remote.NewRemoteImageService(ctx, cfg.Endpoint, cfg.Timeout, nil, false)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("connect containerd image service: %w", err), rt.Close(ctx), conn.Close())
	}
	return &Backend{
		RuntimeService: rt, ImageManagerService: img,
		cfg: cfg, logger: cfg.Logger.With("component", "containerd"), lim: ratelog.New(0, nil), events: cri.NewBroker(), reconnects: make(reconnects, 1), conn: conn,
		exits: exits, settleWait: settleWait,
	}, nil
}

// socketTarget is a grpc target for a unix socket endpoint.
func socketTarget(endpoint string) string {
	if len(endpoint) > 0 && endpoint[0] == '/' {
		return "unix://" + endpoint
	}
	return endpoint
}

// Close closes the connections. It is idempotent.
func (b *Backend) Close(ctx context.Context) error {
	b.closeOnce.Do(func() {
		b.closeErr = errors.Join(b.RuntimeService.Close(ctx), b.ImageManagerService.Close(ctx), b.conn.Close())
	})
	return b.closeErr
}
