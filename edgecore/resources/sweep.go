package resources

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Grants that lost their owner. A grant is claimed before its owner's own
// record is written (the VM backend's "vm" row, the pod manager's pod), so
// an EdgeCore killed between the two leaves a grant no one will release;
// so does a VM whose record, or a pod that, went while EdgeCore was down.
// Sweep, run once at EdgeCore's start (after the VM backend has adopted
// its QEMUs, before anything allocates), releases them.

// Sweep releases, with Release (VFs restored to their drivers), the grant
// of every owner of the pool's rows (cores, hugepages, VFs, grants) for
// which keep is false, and returns those owners. Each is logged and
// counted (tether_edge_resources_swept_total). An owner whose release
// fails keeps its rows and is named in the error; the others are still
// released.
func (p *Pool) Sweep(ctx context.Context, keep func(owner string) bool) ([]string, error) {
	rows, err := p.allocs.Kind(ctx, "")
	if err != nil {
		return nil, fmt.Errorf("sweep grants: %w", err)
	}
	var owners []string
	for _, r := range rows {
		if !poolKind(r.Kind) || slices.Contains(owners, r.Owner) || keep(r.Owner) {
			continue
		}
		owners = append(owners, r.Owner)
	}
	var released []string
	var errs []error
	for _, owner := range owners {
		if err := p.Release(ctx, owner); err != nil {
			errs = append(errs, fmt.Errorf("sweep grants: %w", err))
			continue
		}
		released = append(released, owner)
		p.swept.Inc()
		p.logger.Warn("grant without an owner released", "owner", owner)
	}
	return released, errors.Join(errs...)
}

// poolKind reports whether kind is one of the pool's rows.
func poolKind(kind string) bool {
	return kind == kindCPU || kind == kindVF || kind == kindGrant || strings.HasPrefix(kind, "hugepages-")
}
