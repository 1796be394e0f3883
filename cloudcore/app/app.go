// Package app wires CloudCore's components together: the cluster CA and
// onboarding, the whitelist, the informer catalog, the per-node
// dispatcher, the upstream writer, the tunnel server, offline autonomy,
// the VirtualMachine controller and the replicas' rebalancing. The cloudcore
// command and end-to-end tests both build CloudCore through it, so what
// the tests run is what ships. It holds no logic of its own.
package app

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/autonomy"
	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/hub"
	"github.com/tetheredge/tether/cloudcore/leader"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/cloudcore/tokens"
	"github.com/tetheredge/tether/cloudcore/upstream"
	"github.com/tetheredge/tether/cloudcore/vm"
	"github.com/tetheredge/tether/cloudcore/whitelist"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/common/serve"
	"github.com/tetheredge/tether/tunnel"
)

// Config is CloudCore's configuration. Zero values mean the defaults
// beside each field.
type Config struct {
	// Kubernetes reaches the API server. Required.
	Kubernetes *rest.Config
	// QUICAddr and WebSocketAddr are the tunnel's addresses; at least one.
	QUICAddr, WebSocketAddr string
	// JoinAddr is the HTTPS join endpoint. Default onboard.DefaultAddr.
	JoinAddr string
	// ServerSANs are the names and IPs in the server certificate. Required.
	ServerSANs []string
	// CertValidity of node certificates. Default onboard.DefaultValidity.
	CertValidity time.Duration
	// CANamespace and CAName locate the CA Secret. Defaults
	// onboard.DefaultCANamespace and onboard.DefaultCAName.
	CANamespace, CAName string
	// KeepAlive and DeadPeerTimeout tune the tunnel. Defaults 5s and 15s.
	KeepAlive, DeadPeerTimeout time.Duration
	// MaxHandshakes bounds the QUIC handshakes in flight
	// (tunnel.ServerConfig.MaxHandshakes). Default
	// tunnel.DefaultMaxHandshakes; negative: no bound.
	MaxHandshakes int
	// EdgeLabel marks edge Nodes. Default catalog.DefaultEdgeLabel.
	EdgeLabel string
	// QPS and Burst bound the API requests of each of CloudCore's two
	// Kubernetes clients (client-go's token bucket). One client writes
	// what edges ask (leases, Node and pod status), so heartbeats never
	// queue behind the other's informer lists, onboarding and renewals.
	// Defaults DefaultQPS and DefaultBurst; client-go's own default of 5
	// and 10 would carry 50 edges' 10-second lease renewals and no more. A
	// RateLimiter set in Kubernetes is used as it is instead.
	QPS   float32
	Burst int
	// RegisterTaintKeys are the taint keys an edge may register its Node
	// with (upstream.Config.RegisterTaintKeys). Default none.
	RegisterTaintKeys []string
	// OfflineAutonomy is how long after a trusted edge's session ended
	// CloudCore keeps renewing its Node Lease in its place, so that the
	// node stays Ready and its pods are not evicted while the site is cut
	// off (cloudcore/autonomy; docs/operations.md). Zero: never, a lost
	// edge is handled as a lost kubelet.
	OfflineAutonomy time.Duration
	// Autonomy configures the leader election of offline autonomy's
	// stand-in. The zero value elects on the Lease
	// autonomy.DefaultLeaseName in CANamespace.
	Autonomy AutonomyConfig
	// VMs configures the VirtualMachine controller (cloudcore/vm). The
	// zero value runs it, behind a leader election Lease in CANamespace.
	VMs VMConfig
	// Rebalance spreads edges over the replicas (cloudcore/hub's
	// Balancer; docs/protocol.md, "Rebalancing"). The zero value does not.
	Rebalance RebalanceConfig
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives every component's metrics; may be nil. When it
	// is also a prometheus.Gatherer (a *prometheus.Registry), the
	// operations endpoint serves it on /metrics.
	Registerer prometheus.Registerer
	// MetricsAddr is the operations endpoint's TCP address (/metrics,
	// /healthz, /livez, /readyz; common/serve), bound by New and released
	// when Run returns. "" or "0": none. The cloudcore command defaults it
	// to DefaultMetricsAddr.
	MetricsAddr string
	// Pprof serves net/http/pprof's profiles under /debug/pprof/ on the
	// operations endpoint. Default off.
	Pprof bool
}

// VMConfig configures the VirtualMachine controller. Zero values run it
// with leader election.
type VMConfig struct {
	// Disabled does not run the controller: VirtualMachines get no pods.
	Disabled bool
	// NoLeaderElection runs it without the Lease: only where exactly one
	// CloudCore runs. Default: leader election on the Lease
	// vm.DefaultLeaseName in CANamespace.
	NoLeaderElection bool
	// Identity names this replica in the Lease. Default: the host name
	// and a random suffix.
	Identity string
}

// AutonomyConfig configures which replica stands in for offline edges
// (cloudcore/autonomy). Zero values mean the defaults beside each field.
type AutonomyConfig struct {
	// NoLeaderElection stands in without the Lease: only where exactly
	// one CloudCore runs. Default: leader election.
	NoLeaderElection bool
	// LeaseName is the leader election Lease in CANamespace. Default
	// autonomy.DefaultLeaseName.
	LeaseName string
	// LeaseDuration, RenewDeadline and RetryPeriod of the election.
	// Defaults leader.DefaultLeaseDuration, DefaultRenewDeadline and
	// DefaultRetryPeriod: a killed leader's successor stands in within
	// LeaseDuration plus RetryPeriod.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

// RebalanceConfig configures rebalancing. Zero values mean the defaults
// beside each field.
type RebalanceConfig struct {
	// Enabled publishes this replica's session count in a Lease in
	// CANamespace and moves sessions to less loaded replicas. Default
	// off (the cloudcore command turns it on).
	Enabled bool
	// Address is how edges reach this replica (as in edgecore's
	// --cloud), the hint other replicas give their edges. Default none:
	// edges moved off other replicas go on with their own list.
	Address string
	// Period of publishing and deciding. Default hub.DefaultBalancePeriod.
	Period time.Duration
}

// Client rate limits by default: enough for about 8,000 edges renewing a
// lease every 10 s and reporting status every minute (about 950 writes/s),
// with the burst absorbing the surge of a mass reconnect. The API server
// protects itself with priority and fairness; these only keep one
// CloudCore from being the client that floods it.
const (
	DefaultQPS   = 1000
	DefaultBurst = 2000
)

// App is a wired CloudCore.
type App struct {
	ca     *pki.CA
	cat    *catalog.Catalog
	wl     *whitelist.Whitelist
	join   *onboard.Service
	srv    *tunnel.Server
	nodes  *edgenode.Client
	logger *slog.Logger
	hub    *hub.Hub
	disp   *dispatch.Dispatcher
	auto   *autonomy.Controller
	vms    *vm.Controller // nil when disabled
	conns  *edgenode.ConnectionWriter
	bal    *hub.Balancer // nil when rebalancing is off
	ops    opsState
	opsSrv *serve.Server // nil when MetricsAddr is off
}

// New builds CloudCore: it loads or creates the cluster CA (an API call)
// and wires everything; Run starts it.
func New(ctx context.Context, cfg Config) (*App, error) {
	if cfg.Kubernetes == nil {
		return nil, errors.New("cloudcore: a Kubernetes client config is required")
	}
	if len(cfg.ServerSANs) == 0 {
		return nil, errors.New("cloudcore: at least one server SAN is required")
	}
	if cfg.CANamespace == "" {
		cfg.CANamespace = onboard.DefaultCANamespace
	}
	if cfg.CAName == "" {
		cfg.CAName = onboard.DefaultCAName
	}
	if cfg.EdgeLabel == "" {
		cfg.EdgeLabel = catalog.DefaultEdgeLabel
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.QPS <= 0 {
		cfg.QPS = DefaultQPS
	}
	if cfg.Burst <= 0 {
		cfg.Burst = DefaultBurst
	}
	logger := cfg.Logger
	kube := rateLimited(cfg.Kubernetes, cfg.QPS, cfg.Burst)
	client, err := kubernetes.NewForConfig(kube)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	// Its own config, so its own token bucket.
	upClient, err := kubernetes.NewForConfig(rateLimited(cfg.Kubernetes, cfg.QPS, cfg.Burst))
	if err != nil {
		return nil, fmt.Errorf("kubernetes upstream client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(kube)
	if err != nil {
		return nil, fmt.Errorf("kubernetes dynamic client: %w", err)
	}
	ca, err := onboard.EnsureCA(ctx, client, cfg.CANamespace, cfg.CAName, logger)
	if err != nil {
		return nil, err
	}
	serverCert, err := onboard.ServerCertificate(ca, cfg.ServerSANs, 365*24*time.Hour)
	if err != nil {
		return nil, err
	}
	nodes := edgenode.NewClient(dyn)
	issuer := &onboard.Issuer{CA: ca, Validity: cfg.CertValidity}
	renewer, err := onboard.NewRenewer(onboard.RenewerConfig{EdgeNodes: nodes, Issuer: issuer, Logger: logger, Registerer: cfg.Registerer})
	if err != nil {
		return nil, err
	}
	// The join endpoint is open to anyone with a well-formed token: it gets
	// a client of its own, so that a flood of joins cannot take the API
	// capacity the edges' sessions, renewals and the whitelist use.
	joinKube := rest.CopyConfig(cfg.Kubernetes)
	joinKube.QPS, joinKube.Burst = onboard.DefaultClientQPS, onboard.DefaultClientBurst
	joinDyn, err := dynamic.NewForConfig(joinKube)
	if err != nil {
		return nil, fmt.Errorf("kubernetes dynamic client for joins: %w", err)
	}
	joinSvc, err := onboard.New(onboard.Config{
		Addr: cfg.JoinAddr, TLS: &tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS13},
		EdgeNodes: edgenode.NewClient(joinDyn), Issuer: issuer, Logger: logger, Registerer: cfg.Registerer,
	})
	if err != nil {
		return nil, err
	}
	wl := whitelist.New(dyn, logger, nil)
	cat, err := catalog.New(client, catalog.Config{EdgeLabel: cfg.EdgeLabel, Logger: logger})
	if err != nil {
		return nil, err
	}
	up, err := upstream.New(upClient, cat, upstream.Config{
		EdgeLabel: cfg.EdgeLabel, Labels: wl.Labels, Taints: edgeNodeTaints(wl), RegisterTaintKeys: cfg.RegisterTaintKeys,
		Logger: logger, Registerer: cfg.Registerer,
	})
	if err != nil {
		return nil, err
	}
	toks, err := tokens.New(upClient, cat, tokens.Config{Logger: logger, Registerer: cfg.Registerer})
	if err != nil {
		return nil, err
	}
	conns, err := edgenode.NewConnectionWriter(nodes, edgenode.ConnectionWriterConfig{
		Replica: replicaName(), Get: wl.Get, Logger: logger, Registerer: cfg.Registerer,
	})
	if err != nil {
		return nil, err
	}
	disp, err := dispatch.New(dispatch.Deps{Catalog: cat, Upstream: up, Renewer: renewer, Tokens: toks, Sessions: conns}, dispatch.Config{}, logger, cfg.Registerer)
	if err != nil {
		return nil, err
	}
	cat.Subscribe(disp.Notify)
	h := hub.New(disp, wl, logger)
	wl.OnChange(h.Recheck)
	identity := cfg.VMs.Identity
	if identity == "" {
		identity = leader.Identity()
	}
	auto, err := autonomy.New(upClient, h, cat, autonomy.Config{
		Window: cfg.OfflineAutonomy, Trusted: trusted(wl), Logger: logger, Registerer: cfg.Registerer,
		LeaderElection: leader.Config{
			Disabled: cfg.Autonomy.NoLeaderElection, Namespace: cfg.CANamespace, Name: cfg.Autonomy.LeaseName, Identity: identity,
			LeaseDuration: cfg.Autonomy.LeaseDuration, RenewDeadline: cfg.Autonomy.RenewDeadline, RetryPeriod: cfg.Autonomy.RetryPeriod,
		},
	})
	if err != nil {
		return nil, err
	}
	var vms *vm.Controller
	if !cfg.VMs.Disabled {
		vms, err = vm.New(client, dyn, vm.Config{
			LeaderElection: vm.LeaderElection{Disabled: cfg.VMs.NoLeaderElection, Namespace: cfg.CANamespace, Identity: identity},
			Logger:         logger, Registerer: cfg.Registerer,
		})
		if err != nil {
			return nil, err
		}
	}
	var bal *hub.Balancer
	if cfg.Rebalance.Enabled {
		bal, err = hub.NewBalancer(h, client, hub.BalancerConfig{
			Namespace: cfg.CANamespace, Identity: identity, Address: cfg.Rebalance.Address, Period: cfg.Rebalance.Period,
			Logger: logger, Registerer: cfg.Registerer,
		})
		if err != nil {
			return nil, err
		}
	}
	resetKey, err := caDerivedKey(ca, labelStatelessReset)
	if err != nil {
		return nil, err
	}
	ticketSecret, err := caDerivedKey(ca, labelSessionTickets)
	if err != nil {
		return nil, err
	}
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		StatelessResetKey:   resetKey,
		SessionTicketSecret: ticketSecret,
		Options:             tunnel.Options{KeepAlive: cfg.KeepAlive, DeadPeerTimeout: cfg.DeadPeerTimeout, Logger: logger, Registerer: cfg.Registerer},
		QUICAddr:            cfg.QUICAddr,
		WebSocketAddr:       cfg.WebSocketAddr,
		MaxHandshakes:       cfg.MaxHandshakes,
		TLS:                 &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientCAs: ca.Pool(), MinVersion: tls.VersionTLS13},
		Authorize:           wl.Authorize,
		Handler:             h,
	})
	if err != nil {
		return nil, err
	}
	a := &App{ca: ca, cat: cat, wl: wl, join: joinSvc, srv: srv, nodes: nodes, logger: logger, hub: h, disp: disp, auto: auto, vms: vms, conns: conns, bal: bal}
	if a.opsSrv, err = a.newOps(cfg, logger); err != nil {
		return nil, err
	}
	return a, nil
}

// replicaName names this CloudCore in EdgeNodes' status.connection: its
// host name (a pod's name in a Deployment).
func replicaName() string {
	if h, err := os.Hostname(); err == nil && h != "" {
		return h
	}
	return "cloudcore"
}

// rateLimited returns a copy of base whose clients allow qps requests per
// second with burst, unless base brings its own RateLimiter.
func rateLimited(base *rest.Config, qps float32, burst int) *rest.Config {
	c := rest.CopyConfig(base)
	c.QPS, c.Burst = qps, burst
	return c
}

// edgeNodeTaints returns the operator's taints for a node: its EdgeNode's
// spec.taints.
func edgeNodeTaints(wl *whitelist.Whitelist) func(node string) []corev1.Taint {
	return func(node string) []corev1.Taint {
		if e, ok := wl.Get(node); ok {
			return e.Spec.Taints
		}
		return nil
	}
}

// trusted says whether node's EdgeNode exists and is allowed.
func trusted(wl *whitelist.Whitelist) func(node string) bool {
	return func(node string) bool {
		e, ok := wl.Get(node)
		return ok && e.Spec.Allowed
	}
}

// Listen binds the tunnel and join addresses (Run does it otherwise), so a
// caller can learn them first.
func (a *App) Listen() error {
	if err := a.srv.Listen(); err != nil {
		return err
	}
	return a.join.Listen()
}

// QUICAddr returns the bound QUIC address.
func (a *App) QUICAddr() net.Addr { return a.srv.QUICAddr() }

// WebSocketAddr returns the bound WebSocket address.
func (a *App) WebSocketAddr() net.Addr { return a.srv.WebSocketAddr() }

// JoinAddr returns the bound join address.
func (a *App) JoinAddr() net.Addr { return a.join.Addr() }

// CA returns the cluster CA.
func (a *App) CA() *pki.CA { return a.ca }

// Catalog returns the informer catalog (read-only use).
func (a *App) Catalog() *catalog.Catalog { return a.cat }

// EdgeNodes returns the whitelist client.
func (a *App) EdgeNodes() *edgenode.Client { return a.nodes }

// Connected returns the nodes with a live session.
func (a *App) Connected() []string { return a.hub.Connected() }

// Authorize is the whitelist's handshake check of id, for tests that wait
// until the whitelist has seen an EdgeNode they wrote.
func (a *App) Authorize(id tunnel.Identity) error { return a.wl.Authorize(id) }

// Run serves until ctx ends and joins every component.
func (a *App) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.cat.Run(ctx) })
	g.Go(func() error { return a.wl.Run(ctx) })
	g.Go(func() error { return a.join.Run(ctx) })
	g.Go(func() error { return a.conns.Run(ctx) })
	g.Go(func() error {
		// Serving before the caches are complete would tell edges to prune
		// objects the cloud has simply not seen yet, and refuse allowed nodes.
		if err := a.cat.WaitForSync(ctx); err != nil {
			return err
		}
		if err := a.wl.WaitForSync(ctx); err != nil {
			return err
		}
		a.logger.Info("cloudcore ready")
		a.ops.synced.Store(true)
		return a.srv.Run(ctx)
	})
	g.Go(func() error {
		// Autonomy's trust is the whitelist's and its Nodes are the
		// catalog's: before both are synced every node looks untrusted
		// or absent, and a leader would not stand in for a site that is
		// offline (CloudCore restarted during an outage).
		if err := a.wl.WaitForSync(ctx); err != nil {
			return err
		}
		if err := a.cat.WaitForSync(ctx); err != nil {
			return err
		}
		return a.auto.Run(ctx)
	})
	if a.vms != nil {
		g.Go(func() error { return a.vms.Run(ctx) })
	}
	if a.bal != nil {
		g.Go(func() error {
			// Counting sessions before serving them would tell the
			// others this replica is empty.
			if err := a.cat.WaitForSync(ctx); err != nil {
				return err
			}
			return a.bal.Run(ctx)
		})
	}
	if a.opsSrv != nil {
		g.Go(func() error { return a.opsSrv.Run(ctx) })
	}
	err := g.Wait()
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// Keys derived from the cluster CA's private key (HMAC-SHA256 with a label
// per use): secret, and the same for every run and replica of CloudCore.
const (
	// The QUIC stateless reset key: a restarted CloudCore resets its
	// predecessor's connections, and edges reconnect at once instead of
	// after their dead-peer timeout.
	labelStatelessReset = "tether quic stateless reset key v1"
	// The TLS session ticket secret (tunnel.ServerConfig.SessionTicketSecret):
	// a ticket issued by one replica resumes on any other, and after a
	// restart. The tunnel derives the rotating ticket keys from it.
	labelSessionTickets = "tether tls session ticket secret v1"
)

// caDerivedKey derives the 32-byte key for label from the CA's private key.
func caDerivedKey(ca *pki.CA, label string) (*[32]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, fmt.Errorf("derive %s: %w", label, err)
	}
	mac := hmac.New(sha256.New, der)
	mac.Write([]byte(label))
	var k [32]byte
	copy(k[:], mac.Sum(nil))
	return &k, nil
}
