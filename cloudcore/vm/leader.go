package vm

import (
	"context"
	"fmt"

	"github.com/tetheredge/tether/cloudcore/leader"
)

// DefaultLeaseName is the Lease the VM controllers of several CloudCore
// replicas elect their leader on.
const DefaultLeaseName = "tether-vm-controller"

// LeaderElection configures the Lease that lets one of several CloudCore
// replicas run the controller (cloudcore/leader). Its Name defaults to
// DefaultLeaseName.
type LeaderElection = leader.Config

func withDefaults(le LeaderElection) (LeaderElection, error) {
	if !le.Disabled && le.Name == "" {
		le.Name = DefaultLeaseName
	}
	le, err := le.WithDefaults()
	if err != nil {
		return le, fmt.Errorf("vm: %w", err)
	}
	return le, nil
}

// elect campaigns for the Lease until ctx ends, and leads while it holds
// it: a lost Lease ends the term (informers and workers stop) and the
// campaign starts again. The Lease is released when ctx ends, so another
// replica takes over at once.
func (c *Controller) elect(ctx context.Context) error {
	return leader.Run(ctx, c.kube, c.cfg.LeaderElection, c.logger, c.lead)
}
