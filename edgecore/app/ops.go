package app

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/tetheredge/tether/common/serve"
	"github.com/tetheredge/tether/edgecore/nodestatus"
)

// DefaultMetricsAddr is the operations endpoint's address the edgecore
// command listens on by default: local only (docs/operations.md).
const DefaultMetricsAddr = "127.0.0.1:10351"

// newOps binds EdgeCore's operations endpoint on a.cfg.MetricsAddr, or
// returns nil when it is off. Readiness: the store answers a read and,
// when a pod manager runs, rt (the runtime it drives) has answered once.
func (a *App) newOps(rt nodestatus.Runtime, runsPods bool) (*serve.Server, error) {
	if serve.Disabled(a.cfg.MetricsAddr) {
		return nil, nil
	}
	ready := []serve.Check{{Name: "store", Func: func(ctx context.Context) error {
		if _, err := a.st.Count(ctx); err != nil {
			return fmt.Errorf("read the store: %w", err)
		}
		return nil
	}}}
	if runsPods && rt != nil {
		var answered atomic.Bool
		ready = append(ready, serve.Check{Name: "container-runtime", Func: func(ctx context.Context) error {
			if answered.Load() {
				return nil
			}
			if _, err := rt.RuntimeStatus(ctx); err != nil {
				return fmt.Errorf("the container runtime has not answered yet: %w", err)
			}
			answered.Store(true)
			return nil
		}})
	}
	return serve.New(serve.Config{
		Addr:     a.cfg.MetricsAddr,
		Gatherer: serve.GathererOf(a.cfg.Registerer),
		Logger:   a.logger,
		Ready:    ready,
	})
}

// runOps serves the operations endpoint, if any, until ctx ends.
func (a *App) runOps(ctx context.Context) error {
	if a.ops == nil {
		return nil
	}
	return a.ops.Run(ctx)
}

// closeOps releases the endpoint's listener if Run never served it.
func (a *App) closeOps() error {
	if a.ops == nil {
		return nil
	}
	return a.ops.Close()
}

// MetricsAddr returns the operations endpoint's bound address, or nil
// when it is off.
func (a *App) MetricsAddr() net.Addr {
	if a.ops == nil {
		return nil
	}
	return a.ops.Addr()
}
