package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Defaults of LeaderElection: client-go's usual ones (kube-controller-manager's).
const (
	DefaultLeaseName     = "tether-vm-controller"
	DefaultLeaseDuration = 15 * time.Second
	DefaultRenewDeadline = 10 * time.Second
	DefaultRetryPeriod   = 2 * time.Second
)

// LeaderElection configures the Lease that lets one of several CloudCore
// replicas run the controller. Zero values mean the defaults beside each
// field.
type LeaderElection struct {
	// Disabled runs the controller without a Lease: only right when one
	// CloudCore runs.
	Disabled bool
	// Namespace holds the Lease (CloudCore's namespace). Required unless
	// Disabled.
	Namespace string
	// Name of the Lease. Default DefaultLeaseName.
	Name string
	// Identity names this replica in the Lease. Default the host name and
	// a random suffix.
	Identity string
	// LeaseDuration, RenewDeadline and RetryPeriod are client-go's.
	// Defaults DefaultLeaseDuration, DefaultRenewDeadline and
	// DefaultRetryPeriod; RenewDeadline must be below LeaseDuration.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

func (le LeaderElection) withDefaults() (LeaderElection, error) {
	if le.Disabled {
		return le, nil
	}
	if le.Namespace == "" {
		return le, errors.New("vm: leader election needs the namespace of its Lease")
	}
	if le.Name == "" {
		le.Name = DefaultLeaseName
	}
	if le.Identity == "" {
		host, _ := os.Hostname()
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		le.Identity = host + "_" + hex.EncodeToString(b)
	}
	if le.LeaseDuration <= 0 {
		le.LeaseDuration = DefaultLeaseDuration
	}
	if le.RenewDeadline <= 0 {
		le.RenewDeadline = DefaultRenewDeadline
	}
	if le.RetryPeriod <= 0 {
		le.RetryPeriod = DefaultRetryPeriod
	}
	if le.RenewDeadline >= le.LeaseDuration {
		return le, fmt.Errorf("vm: leader election renew deadline %v is not below the lease duration %v", le.RenewDeadline, le.LeaseDuration)
	}
	return le, nil
}

// elect campaigns for the Lease until ctx ends, and leads while it holds
// it. A lost Lease ends the term (informers and workers stop) and the
// campaign starts again. The Lease is released when ctx ends, so another
// replica takes over at once.
func (c *Controller) elect(ctx context.Context) error {
	le := c.cfg.LeaderElection
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: le.Namespace, Name: le.Name},
		Client:     c.kube.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: le.Identity},
	}
	for ctx.Err() == nil {
		if err := c.campaign(ctx, lock); err != nil {
			return err
		}
	}
	return nil
}

// campaign is one election: it returns when the Lease is lost or ctx
// ends, after the term it led (if any) has stopped.
func (c *Controller) campaign(ctx context.Context, lock resourcelock.Interface) error {
	le := c.cfg.LeaderElection
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	leading := make(chan struct{})
	var once sync.Once
	elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   le.LeaseDuration,
		RenewDeadline:   le.RenewDeadline,
		RetryPeriod:     le.RetryPeriod,
		ReleaseOnCancel: true,
		Name:            le.Name,
		Callbacks: leaderelection.LeaderCallbacks{
			// client-go calls this on a goroutine of its own, which it
			// does not join: it only signals, and the term runs in the
			// group below.
			OnStartedLeading: func(context.Context) { once.Do(func() { close(leading) }) },
			OnStoppedLeading: func() {},
		},
	})
	if err != nil {
		return fmt.Errorf("set up vm controller leader election: %w", err)
	}
	var g errgroup.Group
	g.Go(func() error {
		defer cancel() // the Lease is lost or released: end the term
		elector.Run(ctx)
		return nil
	})
	g.Go(func() error {
		defer cancel() // a failed term gives the Lease up
		select {
		case <-leading:
		case <-ctx.Done():
			return nil
		}
		c.logger.Info("vm controller leading", "lease", le.Namespace+"/"+le.Name, "identity", le.Identity)
		err := c.lead(ctx)
		c.logger.Info("vm controller stopped leading", "identity", le.Identity)
		return err
	})
	return g.Wait()
}
