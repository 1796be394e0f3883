package app

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync/atomic"

	"github.com/tetheredge/tether/common/serve"
)

// DefaultMetricsAddr is the operations endpoint's address the cloudcore
// command listens on by default: local only (docs/operations.md).
const DefaultMetricsAddr = "127.0.0.1:10350"

// opsState is what CloudCore's readiness checks look at.
type opsState struct {
	// synced is set once the catalog's and the whitelist's informers have
	// listed everything, just before the tunnel starts serving.
	synced atomic.Bool
}

// newOps binds CloudCore's operations endpoint on cfg.MetricsAddr, or
// returns nil when it is off. Readiness: the informers synced and the
// tunnel and join listeners bound.
func (a *App) newOps(cfg Config, logger *slog.Logger) (*serve.Server, error) {
	if serve.Disabled(cfg.MetricsAddr) {
		return nil, nil
	}
	return serve.New(serve.Config{
		Addr:     cfg.MetricsAddr,
		Gatherer: serve.GathererOf(cfg.Registerer),
		Logger:   logger,
		Pprof:    cfg.Pprof,
		Ready: []serve.Check{
			{Name: "informers-synced", Func: func(context.Context) error {
				if !a.ops.synced.Load() {
					return errors.New("the catalog's and whitelist's informers have not synced")
				}
				return nil
			}},
			{Name: "listeners", Func: func(context.Context) error {
				if (cfg.QUICAddr != "" && a.srv.QUICAddr() == nil) || (cfg.WebSocketAddr != "" && a.srv.WebSocketAddr() == nil) {
					return errors.New("the tunnel is not listening")
				}
				if a.join.Addr() == nil {
					return errors.New("the join endpoint is not listening")
				}
				return nil
			}},
		},
	})
}

// MetricsAddr returns the operations endpoint's bound address, or nil
// when it is off.
func (a *App) MetricsAddr() net.Addr {
	if a.opsSrv == nil {
		return nil
	}
	return a.opsSrv.Addr()
}
