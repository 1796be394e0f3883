// Package leader runs a piece of CloudCore on one replica at a time: the
// work that must happen once per cluster however many CloudCore replicas
// serve edges (the VirtualMachine controller, the offline-autonomy
// stand-in for edges whose replica died). It is client-go's Lease-based
// leader election with a term that starts and stops with the Lease. It
// knows nothing of what the term does and must not hold any of its state.
package leader

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/util/retry"
)

// Defaults of Config: client-go's usual ones (kube-controller-manager's).
const (
	DefaultLeaseDuration = 15 * time.Second
	DefaultRenewDeadline = 10 * time.Second
	DefaultRetryPeriod   = 2 * time.Second
)

// Config configures the Lease that lets one of several CloudCore replicas
// run a term. Zero values mean the defaults beside each field.
type Config struct {
	// Disabled runs the term without a Lease: only right when one
	// CloudCore runs.
	Disabled bool
	// Namespace holds the Lease (CloudCore's namespace). Required unless
	// Disabled.
	Namespace string
	// Name of the Lease. Required unless Disabled; a user of this package
	// usually fills in its own default.
	Name string
	// Identity names this replica in the Lease. Default Identity().
	Identity string
	// LeaseDuration, RenewDeadline and RetryPeriod are client-go's.
	// Defaults DefaultLeaseDuration, DefaultRenewDeadline and
	// DefaultRetryPeriod; RenewDeadline must be below LeaseDuration.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

// WithDefaults returns a copy of c with the defaults filled in, or why c
// cannot work.
func (c Config) WithDefaults() (Config, error) {
	if c.Disabled {
		return c, nil
	}
	if c.Namespace == "" {
		return c, errors.New("leader election needs the namespace of its Lease")
	}
	if c.Name == "" {
		return c, errors.New("leader election needs the name of its Lease")
	}
	if c.Identity == "" {
		c.Identity = Identity()
	}
	if c.LeaseDuration <= 0 {
		c.LeaseDuration = DefaultLeaseDuration
	}
	if c.RenewDeadline <= 0 {
		c.RenewDeadline = DefaultRenewDeadline
	}
	if c.RetryPeriod <= 0 {
		c.RetryPeriod = DefaultRetryPeriod
	}
	if c.RenewDeadline >= c.LeaseDuration {
		return c, fmt.Errorf("leader election renew deadline %v is not below the lease duration %v", c.RenewDeadline, c.LeaseDuration)
	}
	return c, nil
}

// Identity returns a name for this process that no other replica has: the
// host name (the pod name in a Deployment) and a random suffix, so that a
// restarted process is not mistaken for its predecessor.
func Identity() string {
	host, _ := os.Hostname()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return host + "_" + hex.EncodeToString(b)
}

// Run campaigns for the Lease until ctx ends and calls lead while it holds
// it; lead must return soon after its context ends. A lost Lease ends the
// term (lead's context is cancelled and Run waits for it) and the
// campaign starts again; an error from lead gives the Lease up and is
// returned. The Lease is released when ctx ends, so another replica takes
// over at once. With cfg.Disabled, Run is lead(ctx). cfg must have been
// through WithDefaults.
func Run(ctx context.Context, client kubernetes.Interface, cfg Config, logger *slog.Logger, lead func(context.Context) error) error {
	if cfg.Disabled {
		return lead(ctx)
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: cfg.Namespace, Name: cfg.Name},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: cfg.Identity},
	}
	var err error
	for ctx.Err() == nil && err == nil {
		err = campaign(ctx, lock, cfg, logger, lead)
	}
	// Not an error of Run's: an unreleased Lease only delays the next
	// leader until it expires.
	if rerr := release(client, cfg); rerr != nil {
		logger.Warn("leader lease not released", "lease", cfg.Namespace+"/"+cfg.Name, "err", rerr)
	}
	return err
}

// release gives the Lease up if this replica still holds it, so that
// another takes it at its next retry rather than after the lease
// duration. client-go releases it too (ReleaseOnCancel), but once only: a
// conflict with a renewal still in flight when the term ended leaves the
// Lease held. It has a deadline of its own (the renew deadline), since it
// runs after Run's ctx ended.
func release(client kubernetes.Interface, cfg Config) error {
	ctx, cancel := context.WithTimeout(context.Background(), cfg.RenewDeadline)
	defer cancel()
	leases := client.CoordinationV1().Leases(cfg.Namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		l, err := leases.Get(ctx, cfg.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return err
		}
		if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != cfg.Identity {
			return nil // released already, or another replica's
		}
		now := metav1.NewMicroTime(time.Now())
		none, second := "", int32(1)
		l.Spec.HolderIdentity, l.Spec.LeaseDurationSeconds = &none, &second
		l.Spec.AcquireTime, l.Spec.RenewTime = &now, &now
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("release leader lease %s/%s: %w", cfg.Namespace, cfg.Name, err)
	}
	return nil
}

// campaign is one election: it returns when the Lease is lost or ctx
// ends, after the term it led (if any) has stopped.
func campaign(ctx context.Context, lock resourcelock.Interface, cfg Config, logger *slog.Logger, lead func(context.Context) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	leading := make(chan struct{})
	var once sync.Once
	elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   cfg.LeaseDuration,
		RenewDeadline:   cfg.RenewDeadline,
		RetryPeriod:     cfg.RetryPeriod,
		ReleaseOnCancel: true,
		Name:            cfg.Name,
		Callbacks: leaderelection.LeaderCallbacks{
			// client-go calls this on a goroutine of its own, which it
			// does not join: it only signals, and the term runs in the
			// group below.
			OnStartedLeading: func(context.Context) { once.Do(func() { close(leading) }) },
			OnStoppedLeading: func() {},
		},
	})
	if err != nil {
		return fmt.Errorf("set up leader election on %s/%s: %w", cfg.Namespace, cfg.Name, err)
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
		logger.Info("leading", "lease", cfg.Namespace+"/"+cfg.Name, "identity", cfg.Identity)
		err := lead(ctx)
		logger.Info("stopped leading", "lease", cfg.Namespace+"/"+cfg.Name, "identity", cfg.Identity, "err", err)
		return err
	})
	return g.Wait()
}
