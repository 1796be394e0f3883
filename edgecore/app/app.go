// Package app wires EdgeCore's components together: the SQLite store, the
// tunnel client, the syncer, node status, certificate rotation and the
// CRI shim with its containerd backend. The
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
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/edgecore/certs"
	"github.com/tetheredge/tether/edgecore/edgehub"
	"github.com/tetheredge/tether/edgecore/nodestatus"
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
	// from Node.
	NodeStatus nodestatus.Config
	// CRI configures the CRI shim; the zero value runs none.
	CRI CRIConfig
	// WrapStore, when set, wraps the store the syncer writes through
	// (benchmarks and fault-injection tests observe commits that way).
	WrapStore func(*store.Store) syncer.Store
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives every component's metrics; may be nil.
	Registerer prometheus.Registerer
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
	cri      *criShim // nil without CRI.Listen
	logger   *slog.Logger
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
	var sst syncer.Store = st
	if cfg.WrapStore != nil {
		sst = cfg.WrapStore(st)
	}
	sy, err := syncer.New(sst, cfg.Syncer, logger, cfg.Registerer)
	if err != nil {
		_ = st.Close()
		return nil, err
	}
	nsCfg := cfg.NodeStatus
	nsCfg.Node = cfg.Node
	if nsCfg.Registerer == nil {
		nsCfg.Registerer = cfg.Registerer
	}
	reporter, err := nodestatus.New(nsCfg, sy, logger)
	if err != nil {
		_ = st.Close()
		return nil, err
	}
	var shim *criShim
	if cfg.CRI.Listen != "" {
		if shim, err = newCRIShim(ctx, cfg.CRI, st.RuntimeIDs(), logger, cfg.Registerer); err != nil {
			_ = st.Close()
			return nil, err
		}
	}
	rotator := certs.NewRotator(cfg.IdentityDir, cfg.Node, cfg.CA, holder, sy.Renew, logger, nil)
	hub := edgehub.New(client, sy, logger)
	rotator.OnRenewed(func() { hub.Reconnect("certificate renewed") })
	return &App{
		cfg: cfg, st: st, sy: sy, reporter: reporter, rotator: rotator, holder: holder,
		hub: hub, cri: shim, logger: logger,
	}, nil
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
	if a.cri != nil {
		g.Go(func() error { return a.cri.run(ctx) })
	}
	err := g.Wait()
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// Close closes the shim's backend and the store. Call it after Run has
// returned.
func (a *App) Close() error {
	var err error
	if a.cri != nil {
		err = a.cri.close()
	}
	return errors.Join(err, a.st.Close())
}
