package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/flowcontrol"

	"github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/cloudcore/upstream"
	"github.com/tetheredge/tether/edgecore/nodestatus"
)

// leaseDuration is the edges' lease in BenchmarkLeaseRenewLag: renewed
// every quarter of it (2 s), five times as often as kubelet's 10 s, so N
// edges here load CloudCore like 5N real ones.
const leaseDuration = 8 * time.Second

// BenchmarkLeaseRenewLag measures how long an edge's lease renewal takes
// to show in the API server: for every renewal the API server receives,
// the time from the renewTime the edge put in it (its clock, the same
// process's) to the Lease update reaching a watch; and, once per renew
// interval, the age of every edge's Lease as the node lifecycle
// controller would see it (now minus the renewTime the API server holds),
// which must stay below the lease duration or the node goes NotReady.
// Each iteration observes one renew interval, after every edge has
// renewed once. CloudCore's client is limited as app.Config's defaults
// do ("default"), and as client-go's own default of 5 QPS, burst 10 did
// before ("5qps", the baseline); each edge runs the real nodestatus
// reporter into its outbox.
func BenchmarkLeaseRenewLag(b *testing.B) {
	limits := []struct {
		name  string
		qps   float32
		burst int
	}{{"default", app.DefaultQPS, app.DefaultBurst}, {"5qps", 5, 10}}
	for _, edges := range []int{100, 300} {
		for _, l := range limits {
			b.Run(fmt.Sprintf("edges=%d/%s", edges, l.name), func(b *testing.B) { benchLeaseLag(b, edges, l.qps, l.burst) })
		}
	}
}

func benchLeaseLag(b *testing.B, edges int, qps float32, burst int) {
	env := cp.Env(b)
	cs := adminClient(b, env.Config)
	prefix := fmt.Sprintf("lease-%x-", rand.Uint32())
	obs := newLeaseObserver(prefix, time.Now())
	watchLeases(b, cs, obs)

	// A RateLimiter in the config is what every client built from it uses,
	// whatever QPS the harness sets.
	limited := rest.CopyConfig(env.Config)
	limited.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(qps, burst)
	c := startCloud(b, limited, cloudOptions{})
	dir := b.TempDir()
	start := time.Now()
	nodes := make([]string, edges)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("%s%03d", prefix, i)
		id := c.admit(b, nodes[i])
		// The shipped EdgeCore runs the real nodestatus reporter, on the
		// real clock, with the benchmark's lease.
		startEdge(b, id, filepath.Join(dir, nodes[i]), c.addr, edgeOptions{nodeStatus: nodestatus.Config{
			Now: time.Now, LeaseDuration: leaseDuration, MemoryBytes: 1 << 30,
		}})
	}
	b.Cleanup(func() {
		for _, n := range nodes {
			_ = cs.CoreV1().Nodes().Delete(context.Background(), n, metav1.DeleteOptions{})
			_ = cs.CoordinationV1().Leases(upstream.LeaseNamespace).Delete(context.Background(), n, metav1.DeleteOptions{})
		}
	})
	// Every edge registered and renewed once; the baseline may never get
	// there, so the wait is bounded and what was reached is reported.
	renew := leaseDuration / 4
	warm := obs.waitAll(edges, 2*time.Minute)
	b.Logf("%d edges started; %d of them had a lease in the API server after %s; %s",
		edges, warm, time.Since(start).Round(time.Second), processUsage())
	obs.reset()

	var ages []time.Duration
	for b.Loop() {
		deadline := time.Now().Add(renew)
		observe(deadline)
		ages = append(ages, obs.ages(nodes, time.Now())...)
	}
	lags := obs.reset()
	require.NotEmpty(b, lags, "no renewal reached the API server while measuring")
	slices.Sort(lags)
	slices.Sort(ages)
	b.ReportMetric(ms(percentile(lags, 0.5)), "p50-lag-ms")
	b.ReportMetric(ms(percentile(lags, 0.99)), "p99-lag-ms")
	b.ReportMetric(ms(percentile(ages, 0.99)), "p99-age-ms")
	b.ReportMetric(ms(ages[len(ages)-1]), "max-age-ms")
	b.ReportMetric(float64(len(lags))/float64(b.N)/float64(edges), "renewals/edge/interval")
	b.Logf("renew interval %s, lease duration %s, %d edges, client %.0f QPS burst %d:\n  lag (renewTime to watch) over %d renewals: %s\n  lease age (sampled each interval): %s",
		renew, leaseDuration, edges, qps, burst, len(lags), distribution(lags), distribution(ages))
}

// watchLeases feeds obs every Lease update in kube-node-lease until the
// benchmark ends.
func watchLeases(b *testing.B, cs kubernetes.Interface, obs *leaseObserver) {
	b.Helper()
	f := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(upstream.LeaseNamespace))
	inf := f.Coordination().V1().Leases().Informer()
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { obs.seen(obj, time.Now()) },
		UpdateFunc: func(_, obj any) { obs.seen(obj, time.Now()) },
	})
	require.NoError(b, err)
	stop := make(chan struct{})
	f.Start(stop)
	b.Cleanup(func() {
		close(stop)
		f.Shutdown()
	})
	require.True(b, cache.WaitForCacheSync(stop, inf.HasSynced))
}

// leaseObserver records, for the Leases of nodes named with its prefix,
// each renewal's lag and the newest renewTime seen.
type leaseObserver struct {
	prefix string
	start  time.Time
	mu     sync.Mutex
	cond   *sync.Cond
	lags   []time.Duration
	newest map[string]time.Time
}

func newLeaseObserver(prefix string, start time.Time) *leaseObserver {
	o := &leaseObserver{prefix: prefix, start: start, newest: map[string]time.Time{}}
	o.cond = sync.NewCond(&o.mu)
	return o
}

func (o *leaseObserver) seen(obj any, at time.Time) {
	l, ok := obj.(*coordinationv1.Lease)
	if !ok || !strings.HasPrefix(l.Name, o.prefix) || l.Spec.RenewTime == nil {
		return
	}
	renew := l.Spec.RenewTime.Time
	o.mu.Lock()
	defer o.mu.Unlock()
	if renew.After(o.newest[l.Name]) {
		o.newest[l.Name] = renew
		o.lags = append(o.lags, at.Sub(renew))
		o.cond.Broadcast()
	}
}

// waitAll waits until n Leases were seen or timeout passed, and returns
// how many were.
func (o *leaseObserver) waitAll(n int, timeout time.Duration) int {
	deadline := time.Now().Add(timeout)
	wake := time.AfterFunc(timeout, func() { o.mu.Lock(); o.cond.Broadcast(); o.mu.Unlock() })
	defer wake.Stop()
	o.mu.Lock()
	defer o.mu.Unlock()
	for len(o.newest) < n && time.Now().Before(deadline) {
		o.cond.Wait()
	}
	return len(o.newest)
}

// observe blocks until deadline: the observation window of one
// iteration, a measurement and not a synchronisation (renewals are
// recorded by the informer meanwhile).
func observe(deadline time.Time) {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	<-t.C
}

// ages returns, for each node, how old its Lease in the API server is at
// now; a node never seen counts as old as the run.
func (o *leaseObserver) ages(nodes []string, now time.Time) []time.Duration {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]time.Duration, 0, len(nodes))
	for _, n := range nodes {
		renew, ok := o.newest[n]
		if !ok {
			renew = o.start
		}
		out = append(out, now.Sub(renew))
	}
	return out
}

// reset returns the lags recorded so far and forgets them.
func (o *leaseObserver) reset() []time.Duration {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := o.lags
	o.lags = nil
	return out
}
