package app

import "github.com/tetheredge/tether/edgecore/runtime/vm"

// vmPool is the resource pool as the VM backend takes it: nil without
// Config.Resources (a nil *resources.Pool in the interface would not be
// nil to the backend).
func (a *App) vmPool() vm.Pool {
	if a.pool == nil {
		return nil
	}
	return a.pool
}
