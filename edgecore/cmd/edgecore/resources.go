package main

import (
	"github.com/tetheredge/tether/edgecore/config"
	"github.com/tetheredge/tether/edgecore/resources"
)

// poolConfig is the node's resource pool (edgecore/resources) for pods
// and VMs, nil when it is not enabled. c has been validated.
func poolConfig(c config.ResourcePool) (*resources.Config, error) {
	if !c.Enabled {
		return nil, nil
	}
	pools, err := c.VFPools()
	if err != nil {
		return nil, err
	}
	return &resources.Config{ReservedSystemCPUs: c.ReservedCPUs, ReservedDataPlaneCPUs: c.ReservedDataPlaneCPUs, VFPools: pools}, nil
}
