package app

import (
	"context"
	"fmt"

	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
)

// sweepPool releases the resource pool's grants whose owner is gone: an
// owner is kept when it is a recorded VM sandbox (it has a VM record, also
// one whose QEMU is gone: the VM backend released that itself at adoption)
// or the container of a pod the store holds (the static CPU policy's
// owners: the pod manager allocates the same grant again for it). Every
// other grant (EdgeCore killed between the pool's Allocate and the VM
// record, a VM record or a pod gone while EdgeCore was down) is released.
// It runs once, in New, after the VM backend adopted its QEMUs and before
// the shim or the pod manager serve. A failure is logged, not fatal: the
// rows stay and the next start sweeps again.
func (a *App) sweepPool(ctx context.Context) {
	keep, err := a.grantOwners(ctx)
	if err == nil {
		_, err = a.pool.Sweep(ctx, keep)
	}
	if err != nil {
		a.logger.Warn("sweep of grants without an owner failed", "err", err)
	}
}

// grantOwners reads who may hold a grant now.
func (a *App) grantOwners(ctx context.Context) (func(owner string) bool, error) {
	records, err := a.st.Allocations().Kind(ctx, vm.KindVM)
	if err != nil {
		return nil, fmt.Errorf("read vm records: %w", err)
	}
	vms := make(map[string]bool, len(records))
	for _, r := range records {
		vms[r.Owner] = true
	}
	objs, err := a.st.List(ctx, "Pod", "")
	if err != nil {
		return nil, fmt.Errorf("read pods: %w", err)
	}
	uids := make(map[string]bool, len(objs))
	for _, o := range objs {
		if o.Resource.Group == "" && o.Resource.UID != "" {
			uids[o.Resource.UID] = true
		}
	}
	return func(owner string) bool {
		if uid, ok := pods.PodOfCPUOwner(owner); ok {
			return uids[uid]
		}
		return vms[owner]
	}, nil
}
