package hollow

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/upstream"
)

// CapacityConfig is a measurement of the API server's write capacity:
// Writers clients renew Leases leases as fast as the API server answers,
// for Duration, each renewal the merge patch of the spec CloudCore sends
// for an edge (cloudcore/upstream, lease.go). Zero values mean the
// defaults beside each field.
type CapacityConfig struct {
	// Leases is how many leases are renewed in turn. Default 1,000.
	Leases int
	// Writers is how many renewals are in flight at once. Default 32.
	Writers int
	// Duration is the measured window. Default 30s.
	Duration time.Duration
}

// CapacityResult are the figures of a capacity measurement.
type CapacityResult struct {
	// Writes answered OK and Failed otherwise, within the window.
	Writes, Failed int
	// PerSecond is Writes over the window.
	PerSecond float64
	// Latencies of the OK writes.
	Latencies []time.Duration
}

// WriteCapacity creates the leases (cap-00000, ...; kept when they exist)
// and renews them for the window: what the API server can take of the
// heartbeats edges send through CloudCore, on this machine now.
func WriteCapacity(ctx context.Context, cfg *rest.Config, c CapacityConfig) (CapacityResult, error) {
	if c.Leases <= 0 {
		c.Leases = 1000
	}
	if c.Writers <= 0 {
		c.Writers = 32
	}
	if c.Duration <= 0 {
		c.Duration = 30 * time.Second
	}
	cs, err := fastClient(cfg)
	if err != nil {
		return CapacityResult{}, err
	}
	leases := cs.CoordinationV1().Leases(upstream.LeaseNamespace)
	name := func(i int) string { return fmt.Sprintf("cap-%05d", i) }
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.Writers)
	for i := range c.Leases {
		g.Go(func() error {
			l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name(i), Namespace: upstream.LeaseNamespace}}
			if _, err := leases.Create(gctx, l, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
				return fmt.Errorf("create lease %s: %w", l.Name, err)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return CapacityResult{}, err
	}
	var (
		mu  sync.Mutex
		res CapacityResult
		// next is the lease the next renewal is for, in turn.
		next int
	)
	end := time.Now().Add(c.Duration)
	wctx, cancel := context.WithDeadline(ctx, end)
	defer cancel()
	var wg sync.WaitGroup
	for range c.Writers {
		wg.Go(func() {
			for wctx.Err() == nil {
				mu.Lock()
				i := next
				next = (next + 1) % c.Leases
				mu.Unlock()
				now := metav1.NewMicroTime(time.Now())
				patch, _ := json.Marshal(map[string]any{"spec": coordinationv1.LeaseSpec{RenewTime: &now}})
				start := time.Now()
				_, err := leases.Patch(wctx, name(i), types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "hollow-capacity"})
				took := time.Since(start)
				if wctx.Err() != nil {
					return // cut by the window's end: not counted
				}
				mu.Lock()
				if err != nil {
					res.Failed++
				} else {
					res.Writes++
					res.Latencies = append(res.Latencies, took)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res.PerSecond = float64(res.Writes) / c.Duration.Seconds()
	return res, nil
}
