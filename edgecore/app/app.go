// Package app wires EdgeCore's components together: the SQLite store, the
// tunnel client, the syncer, node status, the resource pool, certificate
// rotation, the CRI shim with its containerd and VM backends and, when a
// CRI endpoint is configured, the pod manager. The
// edgecore command and the end-to-end tests both build EdgeCore through
// it, so what the tests run is what ships. It holds no logic of its own.
package app

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	cri "k8s.io/cri-api/pkg/apis"
	remote "k8s.io/cri-client/pkg"

	"github.com/tetheredge/tether/common/serve"
	"github.com/tetheredge/tether/edgecore/certs"
	"github.com/tetheredge/tether/edgecore/edgehub"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tunnel"
)

// Config is EdgeCore's configuration. Zero values mean the defaults beside
// each field.
type Config struct {
	// Cloud are the cloud addresses, tried in order (see
	// tunnel.ClientConfig.Servers). Required.
	Cloud []string
	// Node is this node's name; it must match the certificate. Required.
	Node string
	// Certificate is the node's client certificate with its key (Leaf
	// set). Required.
	Certificate tls.Certificate
	// CA is the cluster CA: it verifies the cloud and renewed
	// certificates. Required.
	CA *x509.Certificate
	// IdentityDir is where renewed certificates are written. Required.
	IdentityDir string
	// DataDir holds the SQLite store (edgecore.db). Required.
	DataDir string
	// KeepAlive and DeadPeerTimeout tune the tunnel. Defaults 5s and 15s.
	KeepAlive, DeadPeerTimeout time.Duration
	// Backoff bounds reconnect delays. Default tunnel's.
	Backoff tunnel.Backoff
	// Syncer tunes the sync protocol. Zero: the syncer's defaults.
	Syncer syncer.Config
	// NodeStatus tunes node status and lease reports; its Node is set
	// from Node, its DataDir, when empty, from DataDir (the filesystem
	// whose size is the ephemeral-storage capacity), and its Held, when
	// nil, is the store. With a
	// CRIEndpoint and no NodeStatus.Runtime, Ready follows that runtime's
	// CRI Status; with neither, the Node is Ready only if
	// NodeStatus.RequireRuntime is false (the edgecore command sets it).
	NodeStatus nodestatus.Config
	// CRIEndpoint is the CRI runtime the pod manager drives, such as
	// "unix:///run/containerd/containerd.sock" or a standalone CRI shim.
	// Empty with CRI.Listen set: the pod manager drives the in-process
	// shim over its socket, and hears containerd's events through it.
	// Empty without: no pod manager, and EdgeCore runs no pods.
	CRIEndpoint string
	// CRITimeout bounds each CRI call. Default 2m (image pulls and stops
	// with a grace period take long).
	CRITimeout time.Duration
	// Pods tunes the pod manager (host IPs, log directory, relist period,
	// restart back-off); its Node and Registerer are set from Node and
	// Registerer, its RootDir (the pods' volumes) defaults to
	// DataDir/pods, and its Tokens and TokenStore to the syncer and the
	// store (service-account tokens from the cloud, kept for offline
	// restarts). Unused without CRIEndpoint.
	Pods pods.Config
	// Resources configures the node's one resource pool for pods and VMs
	// (edgecore/resources: reserved system and data-plane cores, hugepage
	// mounts, SR-IOV VF pools); its Registerer, when nil, is Registerer.
	// The Node then advertises allocatable cpu without the reserved cores
	// and each VF pool as sriov.edge.tether.dev/<pool>. Nil: no pool.
	Resources *resources.Config
	// StaticCPUPolicy gives the pod manager kubelet's CPU manager "static"
	// policy on the resource pool (pods.Config.StaticCPUs): Guaranteed
	// pods with whole cores get cores of their own, never a VM's.
	// Requires Resources. Default false (every container on every CPU).
	StaticCPUPolicy bool
	// CRI configures the CRI shim; the zero value runs none.
	CRI CRIConfig
	// WrapStore, when set, wraps the store the syncer writes through
	// (benchmarks and fault-injection tests observe commits that way).
	WrapStore func(*store.Store) syncer.Store
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives every component's metrics; may be nil. When it
	// is also a prometheus.Gatherer, the operations endpoint serves it.
	Registerer prometheus.Registerer
	// MetricsAddr is the operations endpoint's TCP address (/metrics,
	// /healthz, /livez, /readyz; ops.go), bound by New. "" or "0": none.
	MetricsAddr string
}

// DBFile is the store's file name inside DataDir.
const DBFile = "edgecore.db"

// App is a wired EdgeCore.
type App struct {
	cfg      Config
	st       *store.Store
	sy       *syncer.Syncer
	reporter *nodestatus.Reporter
	rotator  *certs.Rotator
	hub      *edgehub.EdgeHub
	holder   *certs.Holder
	cri      *criShim        // nil without CRI.Listen
	pool     *resources.Pool // nil without Resources
	// viaShim: the pod manager drives the in-process shim, connected in
	// Run; late is node status' runtime until then, events the shim's.
	viaShim bool
	late    *lateRuntime
	events  shimEvents
	logger  *slog.Logger
	// pods, rt and img are nil without a CRI endpoint.
	pods *pods.Manager
	rt   cri.RuntimeService
	img  cri.ImageManagerService
	ops  *serve.Server // nil without MetricsAddr
}

// New opens the store and wires everything; Run starts it. Close releases
// the store.
func New(ctx context.Context, cfg Config) (*App, error) {
	switch {
	case len(cfg.Cloud) == 0:
		return nil, errors.New("edgecore: at least one cloud address is required")
	case cfg.Node == "":
		return nil, errors.New("edgecore: a node name is required")
	case cfg.Certificate.Leaf == nil:
		return nil, errors.New("edgecore: a node certificate (with its parsed leaf) is required")
	case cfg.CA == nil:
		return nil, errors.New("edgecore: the cluster CA is required")
	case cfg.IdentityDir == "":
		return nil, errors.New("edgecore: an identity directory is required")
	case cfg.DataDir == "":
		return nil, errors.New("edgecore: a data directory is required")
	}
	if cn := cfg.Certificate.Leaf.Subject.CommonName; cn != cfg.Node {
		return nil, fmt.Errorf("edgecore: the certificate is for node %q, not %q", cn, cfg.Node)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	logger := cfg.Logger
	pool := x509.NewCertPool()
	pool.AddCert(cfg.CA)
	holder := certs.NewHolder(cfg.Certificate)
	client, err := tunnel.NewClient(tunnel.ClientConfig{
		Options: tunnel.Options{KeepAlive: cfg.KeepAlive, DeadPeerTimeout: cfg.DeadPeerTimeout, Logger: logger, Registerer: cfg.Registerer},
		Servers: cfg.Cloud,
		Node:    cfg.Node,
		Agent:   "edgecore",
		Backoff: cfg.Backoff,
		TLS:     &tls.Config{GetClientCertificate: holder.GetClientCertificate, RootCAs: pool, MinVersion: tls.VersionTLS13},
	})
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	st, err := store.Open(ctx, filepath.Join(cfg.DataDir, DBFile), logger)
	if err != nil {
		return nil, err
	}
	if cfg.Registerer != nil {
		// The store's size and commit latency, the certificate's expiry.
		if err := errors.Join(st.Register(cfg.Registerer), holder.Register(cfg.Registerer)); err != nil {
			return nil, errors.Join(err, st.Close())
		}
	}
	var sst syncer.Store = st
	if cfg.WrapStore != nil {
		sst = cfg.WrapStore(st)
	}
	sy, err := syncer.New(sst, cfg.Syncer, logger, cfg.Registerer)
	if err != nil {
		_ = st.Close()
		return nil, err
	}
	a := &App{cfg: cfg, st: st, sy: sy, holder: holder, logger: logger}
	if cfg.CRIEndpoint != "" {
		if err := a.connectCRI(ctx); err != nil {
			return nil, errors.Join(err, a.Close())
		}
	}
	nsCfg := cfg.NodeStatus
	nsCfg.Node = cfg.Node
	// A copy, never nil, so that wiring may add labels (the VM backend's
	// vm.edge.tether.dev/acceleration) without touching the caller's map.
	nsCfg.Labels = maps.Clone(nsCfg.Labels)
	if nsCfg.Labels == nil {
		nsCfg.Labels = map[string]string{}
	}
	if cfg.Resources != nil {
		if err := a.newPool(&nsCfg); err != nil {
			return nil, errors.Join(err, a.Close())
		}
	}
	a.viaShim = cfg.CRIEndpoint == "" && cfg.CRI.Listen != ""
	switch {
	case nsCfg.Runtime != nil:
	case a.rt != nil:
		// Ready means the runtime the pod manager drives can run pods.
		nsCfg.Runtime = nodestatus.CRI{Service: a.rt}
	case a.viaShim:
		a.late = &lateRuntime{}
		nsCfg.Runtime = a.late
		a.cfg.CRIEndpoint = "unix://" + cfg.CRI.Listen
		a.events = shimEvents{ch: make(chan pods.ContainerEvent, 256)}
	}
	if nsCfg.DataDir == "" {
		nsCfg.DataDir = cfg.DataDir
	}
	// The shim comes first: its VM runtime's probe gives the Node's
	// acceleration label.
	if cfg.CRI.Listen != "" {
		if a.cri, err = newCRIShim(ctx, cfg.CRI, st, a.vmPool(), cfg.DataDir, logger, cfg.Registerer); err != nil {
			return nil, errors.Join(err, a.Close())
		}
		if accel := a.cri.accel(); accel != "" {
			labels := make(map[string]string, len(nsCfg.Labels)+1)
			maps.Copy(labels, nsCfg.Labels)
			labels[LabelAcceleration] = accel
			nsCfg.Labels = labels
		}
	}
	if a.pool != nil {
		// After the VM backend's adoption, before anything allocates.
		a.sweepPool(ctx)
	}
	if nsCfg.Registerer == nil {
		nsCfg.Registerer = cfg.Registerer
	}
	if nsCfg.Held == nil {
		// The cloud's copy of the node's Node: a start that changes
		// nothing registers nothing.
		nsCfg.Held = st
	}
	reporter, err := nodestatus.New(nsCfg, sy, logger)
	if err != nil {
		return nil, errors.Join(err, a.Close())
	}
	rotator := certs.NewRotator(cfg.IdentityDir, cfg.Node, cfg.CA, holder, sy.Renew, logger, nil)
	hub := edgehub.New(client, sy, st, logger)
	rotator.OnRenewed(func() { hub.Reconnect("certificate renewed") })
	a.reporter, a.rotator, a.hub = reporter, rotator, hub
	if a.rt != nil {
		if err := a.newPods(); err != nil {
			return nil, errors.Join(err, a.Close())
		}
	}
	if a.ops, err = a.newOps(nsCfg.Runtime, a.rt != nil || a.viaShim); err != nil {
		return nil, errors.Join(err, a.Close())
	}
	return a, nil
}

// newPool builds the resource pool on the store's allocation table and
// has the Node advertise it.
func (a *App) newPool(nsCfg *nodestatus.Config) error {
	rc := *a.cfg.Resources
	if rc.Registerer == nil {
		rc.Registerer = a.cfg.Registerer
	}
	pool, err := resources.New(rc, a.st.Allocations(), a.logger)
	if err != nil {
		return err
	}
	adv, err := pool.Advertise()
	if err != nil {
		return err
	}
	nsCfg.ReservedCores = nodestatus.ReservedCores{System: adv.ReservedSystemCPUs, DataPlane: adv.ReservedDataPlaneCPUs}
	ext := maps.Clone(nsCfg.ExtendedResources)
	if ext == nil {
		ext = map[corev1.ResourceName]int64{}
	}
	for name, n := range adv.VFs {
		ext[corev1.ResourceName(name)] = n
	}
	nsCfg.ExtendedResources = ext
	a.pool = pool
	return nil
}

// Pool returns the resource pool; nil without Config.Resources.
func (a *App) Pool() *resources.Pool { return a.pool }

// connectCRI connects the CRI clients of the runtime the pod manager
// drives (and node status asks whether it is ready), once the runtime
// answered on a connection of its own (runtimeAnswers).
func (a *App) connectCRI(ctx context.Context) error {
	timeout := a.cfg.CRITimeout
	if timeout <= 0 {
		timeout = 2 * time.Minute
	}
	if err := a.runtimeAnswers(ctx); err != nil {
		return err
	}
	rt, err := remote.NewRemoteRuntimeService(ctx, a.cfg.CRIEndpoint, timeout, nil, false)
	if err != nil {
		return fmt.Errorf("connect CRI runtime %s: %w", a.cfg.CRIEndpoint, err)
	}
	a.rt = rt
	img, err := remote.NewRemoteImageService(ctx, a.cfg.CRIEndpoint, timeout, nil, false)
	if err != nil {
		a.rt = nil
		return errors.Join(fmt.Errorf("connect CRI image service %s: %w", a.cfg.CRIEndpoint, err), rt.Close(ctx))
	}
	a.img = img
	return nil
}

// newPods builds the pod manager, which reads the store, hears its changes
// and publishes through the syncer.
func (a *App) newPods() error {
	var err error
	pcfg := a.cfg.Pods
	pcfg.Node = a.cfg.Node
	if pcfg.RootDir == "" {
		pcfg.RootDir = filepath.Join(a.cfg.DataDir, "pods")
	}
	if pcfg.Registerer == nil {
		pcfg.Registerer = a.cfg.Registerer
	}
	if pcfg.Allocatable == nil {
		// Admission draws on what the Node advertises as allocatable.
		pcfg.Allocatable = a.reporter.Node().Status.Allocatable
	}
	if a.cfg.StaticCPUPolicy && pcfg.StaticCPUs == nil {
		if a.pool == nil {
			return errors.New("edgecore: the static CPU policy needs a resource pool (Config.Resources)")
		}
		pcfg.StaticCPUs = a.pool
	}
	if pcfg.Events == nil && a.viaShim {
		pcfg.Events = a.events
	}
	if pcfg.Tokens == nil {
		// Service-account tokens come from the cloud over the session
		// and are kept in the store for restarts while offline.
		pcfg.Tokens, pcfg.TokenStore = a.sy, a.st
	}
	a.pods, err = pods.New(pcfg, a.st, a.rt, a.img, a.sy, a.logger)
	return err
}

// Store returns the edge store (read-only use by tests and tools).
func (a *App) Store() *store.Store { return a.st }

// Syncer returns the syncer.
func (a *App) Syncer() *syncer.Syncer { return a.sy }

// Certificate returns the certificate the tunnel presents now.
func (a *App) Certificate() *x509.Certificate { return a.holder.Leaf() }

// RenewOnce renews the certificate now, over the live session, as the
// rotator does at 80 % of its lifetime (tests and tools).
func (a *App) RenewOnce(ctx context.Context) error { return a.rotator.RenewOnce(ctx) }

// Run serves until ctx ends and joins every component. It does not close
// the store: Close does.
func (a *App) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.reporter.Run(ctx) })
	g.Go(func() error { return a.rotator.Run(ctx) })
	g.Go(func() error { return a.hub.Run(ctx) })
	g.Go(func() error { return a.runOps(ctx) })
	if a.pods != nil {
		cancel := a.st.Subscribe(a.pods.OnStoreChange)
		defer cancel()
		g.Go(func() error { return a.pods.Run(ctx) })
	}
	if a.cri != nil {
		g.Go(func() error { return a.cri.run(ctx) })
	}
	if a.viaShim {
		for _, src := range a.cri.events(ctx) {
			g.Go(func() error { return a.events.pump(ctx, src) })
		}
		g.Go(func() error {
			if err := a.connectViaShim(ctx); err != nil || a.pods == nil {
				return err
			}
			cancel := a.st.Subscribe(a.pods.OnStoreChange)
			defer cancel()
			return a.pods.Run(ctx)
		})
	}
	err := g.Wait()
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// Close closes the CRI clients, the shim's backend, the operations
// listener (if Run never served it) and the store. Call it after Run has
// returned.
func (a *App) Close() error {
	var errs []error
	ctx := context.Background()
	if a.rt != nil {
		errs = append(errs, a.rt.Close(ctx))
	}
	if a.img != nil {
		errs = append(errs, a.img.Close(ctx))
	}
	if a.cri != nil {
		errs = append(errs, a.cri.close())
	}
	return errors.Join(append(errs, a.closeOps(), a.st.Close())...)
}
