package leader_test

import (
	"context"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/leader"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/testlog"
)

var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

const waitFor = 60 * time.Second

// replica is one Run on the shared Lease; its term counts how many terms
// are active across replicas.
type replica struct {
	name    string
	leading atomic.Bool
	terms   atomic.Int32
	cancel  context.CancelFunc
	done    chan error
}

// TestOneLeaderAndTakeover: of three replicas on one Lease exactly one
// leads at any time; when it stops it releases the Lease and another
// takes over, long before the lease duration.
func TestOneLeaderAndTakeover(t *testing.T) {
	env := cp.Env(t)
	kube, err := kubernetes.NewForConfig(env.Config)
	require.NoError(t, err)
	ns := env.Namespace(t)
	var active, most atomic.Int32
	var mu sync.Mutex
	start := func(name string) *replica {
		cfg, err := leader.Config{Namespace: ns, Name: "test", Identity: name, LeaseDuration: 30 * time.Second,
			RenewDeadline: 20 * time.Second, RetryPeriod: 200 * time.Millisecond}.WithDefaults()
		require.NoError(t, err)
		r := &replica{name: name, done: make(chan error, 1)}
		ctx, cancel := context.WithCancel(context.Background())
		r.cancel = cancel
		go func() {
			r.done <- leader.Run(ctx, kube, cfg, testlog.New(), func(ctx context.Context) error {
				n := active.Add(1)
				mu.Lock()
				if n > most.Load() {
					most.Store(n)
				}
				mu.Unlock()
				r.terms.Add(1)
				r.leading.Store(true)
				<-ctx.Done()
				r.leading.Store(false)
				active.Add(-1)
				return nil
			})
		}()
		t.Cleanup(func() { cancel(); <-r.done })
		return r
	}
	rs := []*replica{start("a"), start("b"), start("c")}
	leaderOf := func() *replica {
		for _, r := range rs {
			if r.leading.Load() {
				return r
			}
		}
		return nil
	}
	require.Eventually(t, func() bool { return leaderOf() != nil }, waitFor, 20*time.Millisecond)
	first := leaderOf()
	first.cancel()
	require.NoError(t, <-first.done)
	first.done <- nil // for the cleanup
	// Run returns only once the Lease is given up (client-go's own release
	// can lose a conflict with a renewal in flight; Run's does not).
	l, err := kube.CoordinationV1().Leases(ns).Get(context.Background(), "test", metav1.GetOptions{})
	require.NoError(t, err)
	require.NotNil(t, l.Spec.HolderIdentity)
	require.NotEqual(t, first.name, *l.Spec.HolderIdentity, "the stopped leader released its Lease")
	// The released Lease is taken at the next retry, not after the 30 s
	// lease duration; the bound here is only against a hang.
	require.Eventually(t, func() bool { l := leaderOf(); return l != nil && l != first }, 20*time.Second, 20*time.Millisecond)
	require.Equal(t, int32(1), most.Load(), "never two terms at once")
}

// TestTermErrorIsReturned: a term that fails gives the Lease up and Run
// returns its error.
func TestTermErrorIsReturned(t *testing.T) {
	env := cp.Env(t)
	kube, err := kubernetes.NewForConfig(env.Config)
	require.NoError(t, err)
	cfg, err := leader.Config{Namespace: env.Namespace(t), Name: "fail", RetryPeriod: 200 * time.Millisecond}.WithDefaults()
	require.NoError(t, err)
	boom := errors.New("boom")
	err = leader.Run(t.Context(), kube, cfg, nil, func(context.Context) error { return boom })
	require.ErrorIs(t, err, boom)
}

func TestConfig(t *testing.T) {
	_, err := leader.Config{Name: "x"}.WithDefaults()
	require.ErrorContains(t, err, "namespace")
	_, err = leader.Config{Namespace: "x"}.WithDefaults()
	require.ErrorContains(t, err, "name")
	_, err = leader.Config{Namespace: "x", Name: "y", LeaseDuration: time.Second, RenewDeadline: 2 * time.Second}.WithDefaults()
	require.ErrorContains(t, err, "not below")
	c, err := leader.Config{Namespace: "x", Name: "y"}.WithDefaults()
	require.NoError(t, err)
	require.NotEmpty(t, c.Identity)
	require.Equal(t, leader.DefaultLeaseDuration, c.LeaseDuration)
	c, err = leader.Config{Disabled: true}.WithDefaults()
	require.NoError(t, err)
	require.True(t, c.Disabled)
}
