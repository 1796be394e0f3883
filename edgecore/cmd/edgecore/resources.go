package main

import (
	"fmt"
	"strings"

	"github.com/spf13/pflag"

	"github.com/tetheredge/tether/edgecore/resources"
)

// poolFlags configure the node's resource pool (edgecore/resources) for
// pods and VMs.
type poolFlags struct {
	enabled             bool
	reserved, dataPlane string
	sriov               []string
	static              bool
}

func addPoolFlags(fl *pflag.FlagSet, f *poolFlags) {
	fl.BoolVar(&f.enabled, "resource-pool", false, "manage the node's cores, hugepages and SR-IOV VFs as one pool for pods and VMs (dedicated CPUs and VFs need it)")
	fl.StringVar(&f.reserved, "reserved-cpus", "", "with --resource-pool: cores kept for the system and EdgeCore, as a CPU list (0-1); not allocatable")
	fl.StringVar(&f.dataPlane, "reserved-data-plane-cpus", "", "with --resource-pool: cores kept for the data plane, as a CPU list; not allocatable")
	fl.StringArrayVar(&f.sriov, "sriov-pool", nil, "with --resource-pool: a VF pool as NAME=PF[,PF...] (PCI addresses of physical functions); repeatable")
	fl.BoolVar(&f.static, "static-cpu-policy", false, "with --resource-pool: Guaranteed pods with whole cores get cores of their own (kubelet's static CPU policy)")
}

// config is the pool's configuration, nil without --resource-pool.
func (f poolFlags) config() (*resources.Config, error) {
	if !f.enabled {
		if f.reserved != "" || f.dataPlane != "" || len(f.sriov) > 0 || f.static {
			return nil, fmt.Errorf("--reserved-cpus, --reserved-data-plane-cpus, --sriov-pool and --static-cpu-policy need --resource-pool")
		}
		return nil, nil
	}
	cfg := &resources.Config{ReservedSystemCPUs: f.reserved, ReservedDataPlaneCPUs: f.dataPlane}
	for _, p := range f.sriov {
		name, pfs, ok := strings.Cut(p, "=")
		if !ok || name == "" || pfs == "" {
			return nil, fmt.Errorf("--sriov-pool %q: want NAME=PF[,PF...]", p)
		}
		if cfg.VFPools == nil {
			cfg.VFPools = map[string][]string{}
		}
		if _, dup := cfg.VFPools[name]; dup {
			return nil, fmt.Errorf("--sriov-pool %q: pool %s named twice", p, name)
		}
		cfg.VFPools[name] = strings.Split(pfs, ",")
	}
	return cfg, nil
}
