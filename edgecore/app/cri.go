package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/edgecore/cri"
	"github.com/tetheredge/tether/edgecore/runtime/containerd"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/store"
)

// CRIConfig is the CRI shim's part of EdgeCore's configuration. The zero
// value disables the shim (EdgeCore then runs no pods and needs no
// containerd).
type CRIConfig struct {
	// Listen is the shim's unix socket, as /run/tether/cri.sock. Empty:
	// no shim.
	Listen string
	// Containerd is containerd's endpoint. Default
	// unix:///run/containerd/containerd.sock.
	Containerd string
	// Handlers are the runtime handlers containerd serves. Default
	// ["", "runc"].
	Handlers []string
	// VMHandler is the handler of virtual machines. Default "tether-vm".
	VMHandler string
	// VM configures the VM runtime behind VMHandler. Nil: none, and the
	// VM handler is refused with FailedPrecondition.
	VM *VMConfig
	// CallTimeout and PullTimeout bound each call and each image pull.
	// Defaults 30 s and 2 min.
	CallTimeout, PullTimeout time.Duration
}

// DefaultContainerd is containerd's usual endpoint.
const DefaultContainerd = "unix:///run/containerd/containerd.sock"

// criShim is the shim, its containerd backend and its VM backend (nil
// without CRIConfig.VM).
type criShim struct {
	srv     *cri.Server
	backend *containerd.Backend
	vm      *vm.Backend
}

// newCRIShim wires the shim over st's id map (and, for VMs, its allocation
// table and the resource pool, nil without one); dataDir is the default
// parent of the VM image store.
func newCRIShim(ctx context.Context, cfg CRIConfig, st *store.Store, pool vm.Pool, dataDir string, logger *slog.Logger, reg prometheus.Registerer) (*criShim, error) {
	endpoint := cfg.Containerd
	if endpoint == "" {
		endpoint = DefaultContainerd
	}
	timeout := max(cfg.CallTimeout, cfg.PullTimeout, cri.DefaultPullTimeout)
	b, err := containerd.New(ctx, containerd.Config{Endpoint: endpoint, Timeout: timeout, Logger: logger, Registerer: reg})
	if err != nil {
		return nil, err
	}
	shim := &criShim{backend: b}
	backends := cri.Backends{Default: b}
	if cfg.VM != nil {
		if shim.vm, err = newVMBackend(ctx, *cfg.VM, dataDir, st, pool, logger, reg); err != nil {
			return nil, errors.Join(err, b.Close(ctx))
		}
		backends.VM = shim.vm
	}
	shim.srv, err = cri.New(cri.Config{
		Listen: cfg.Listen, Handlers: cfg.Handlers, VMHandler: cfg.VMHandler,
		CallTimeout: cfg.CallTimeout, PullTimeout: cfg.PullTimeout, Logger: logger, Registerer: reg,
	}, backends, st.RuntimeIDs())
	if err != nil {
		return nil, errors.Join(err, shim.close())
	}
	return shim, nil
}

// events are the event subscriptions of the shim's backends.
func (c *criShim) events(ctx context.Context) []<-chan cri.Event {
	out := []<-chan cri.Event{c.backend.Events(ctx)}
	if c.vm != nil {
		out = append(out, c.vm.Events(ctx))
	}
	return out
}

// accel is the VM runtime's acceleration, "" without one.
func (c *criShim) accel() string {
	if c == nil || c.vm == nil {
		return ""
	}
	return c.vm.Accel()
}

// run serves the shim and the backend's event subscription until ctx ends.
func (c *criShim) run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.backend.Run(ctx) })
	g.Go(func() error { return c.srv.Run(ctx) })
	return g.Wait()
}

// close closes the backends; the VM backend leaves its QEMUs running.
func (c *criShim) close() error {
	ctx := context.Background()
	err := c.backend.Close(ctx)
	if c.vm != nil {
		err = errors.Join(err, c.vm.Close(ctx))
	}
	return err
}

// CRI is the shim run alone (edgecore cri), with its own store file for
// the id map.
type CRI struct {
	st   *store.Store
	shim *criShim
}

// NewCRI opens the store at dbPath and wires the shim. cfg.Listen is
// required. A nil logger discards.
func NewCRI(ctx context.Context, cfg CRIConfig, dbPath string, logger *slog.Logger, reg prometheus.Registerer) (*CRI, error) {
	if cfg.Listen == "" {
		return nil, errors.New("edgecore cri: a listen socket is required")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Dir(dbPath), 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	st, err := store.Open(ctx, dbPath, logger)
	if err != nil {
		return nil, err
	}
	shim, err := newCRIShim(ctx, cfg, st, nil, filepath.Dir(dbPath), logger, reg)
	if err != nil {
		return nil, errors.Join(err, st.Close())
	}
	return &CRI{st: st, shim: shim}, nil
}

// Run serves until ctx ends.
func (c *CRI) Run(ctx context.Context) error {
	err := c.shim.run(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// Close closes the backend and the store. Call it after Run has returned.
func (c *CRI) Close() error { return errors.Join(c.shim.close(), c.st.Close()) }
