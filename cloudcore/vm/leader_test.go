package vm

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// TestLeaderElection: of two controllers on one Lease exactly one acts;
// when it stops, it releases the Lease and the other takes over.
func TestLeaderElection(t *testing.T) {
	c := newClients(t)
	installRuntimeClass(t, c)
	le := LeaderElection{Namespace: c.ns, Name: "vm-controller", LeaseDuration: 4 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: 200 * time.Millisecond}
	a, b := le, le
	a.Identity, b.Identity = "replica-a", "replica-b"
	ra := start(t, c, Config{LeaderElection: a})
	rb := start(t, c, Config{LeaderElection: b})
	leading := func(r *running) bool { return testutil.ToFloat64(r.c.leader) == 1 }

	var leader, follower *running
	require.Eventually(t, func() bool {
		switch {
		case leading(ra) && !leading(rb):
			leader, follower = ra, rb
		case leading(rb) && !leading(ra):
			leader, follower = rb, ra
		}
		return leader != nil
	}, waitFor, tick, "one leader")

	_, err := c.vms.Create(t.Context(), validVM(c.ns, "one"))
	require.NoError(t, err)
	c.waitPod(t, "one", "")
	c.waitVM(t, "one", inPhase(PhaseScheduled))
	require.False(t, leading(follower), "never two leaders")
	require.Equal(t, 1.0, leader.counter(t, "tether_vm_pod_writes_total", map[string]string{"op": "create"}))
	require.Zero(t, follower.counter(t, "tether_vm_syncs_total", nil), "the follower syncs nothing")
	require.Zero(t, follower.counter(t, "tether_vm_pod_writes_total", nil))

	leader.stop(t)
	require.Eventually(t, func() bool { return leading(follower) }, waitFor, tick, "the follower takes over")
	_, err = c.vms.Create(t.Context(), validVM(c.ns, "two"))
	require.NoError(t, err)
	c.waitPod(t, "two", "")
	require.Equal(t, 1.0, follower.counter(t, "tether_vm_pod_writes_total", map[string]string{"op": "create"}))
	require.Equal(t, 1.0, leader.counter(t, "tether_vm_pod_writes_total", map[string]string{"op": "create"}), "the stopped one wrote nothing more")
}

// TestLeaderElectionConfig: the Lease needs a namespace, and client-go's
// ordering of its durations is checked at New.
func TestLeaderElectionConfig(t *testing.T) {
	c := newClients(t)
	_, err := New(c.kube, c.dyn, Config{})
	require.ErrorContains(t, err, "namespace of its Lease")
	_, err = New(c.kube, c.dyn, Config{LeaderElection: LeaderElection{Namespace: "x", LeaseDuration: time.Second, RenewDeadline: 2 * time.Second}})
	require.ErrorContains(t, err, "not below the lease duration")
	_, err = New(nil, c.dyn, Config{LeaderElection: LeaderElection{Disabled: true}})
	require.Error(t, err)
	ctl, err := New(c.kube, c.dyn, Config{LeaderElection: LeaderElection{Namespace: "x"}, Logger: nil})
	require.NoError(t, err, "a nil logger is a discard logger")
	require.NotEmpty(t, ctl.cfg.LeaderElection.Identity)
}
