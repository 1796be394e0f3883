package autonomy

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	authenticationv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/leader"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/promtest"
)

// cp is the real etcd and kube-apiserver the tests of this package share.
var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

// sessions is the hub as the controller sees it.
type sessions struct {
	mu    sync.Mutex
	nodes []string
}

func (s *sessions) Connected() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.nodes...)
}

func (s *sessions) set(nodes ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes = nodes
}

// replica is one CloudCore's controller as the tests drive it: its
// per-session look, and its leader term (nil while it does not lead).
type replica struct {
	c    *Controller
	sess *sessions
	reg  *promtest.Registry
	term *term
}

// fixture is the shared control plane with a real catalog (the Node
// cache every replica reads), a clock the test moves, and one edge Node
// with a 40 s Lease renewed at the clock's start.
type fixture struct {
	cs      kubernetes.Interface
	cat     *catalog.Catalog
	now     time.Time
	node    string
	trusted bool
	r       *replica // the replica most tests drive
}

func newFixture(t *testing.T, window time.Duration) *fixture {
	t.Helper()
	cs := adminClient(t)
	f := &fixture{cs: cs, now: time.Now().Truncate(time.Second), trusted: true}
	ctx := t.Context()
	var err error
	f.cat, err = catalog.New(cs, catalog.Config{})
	require.NoError(t, err)
	catCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.cat.Run(catCtx) }()
	t.Cleanup(func() { stop(); require.NoError(t, <-done) })
	require.NoError(t, f.cat.WaitForSync(ctx))
	f.node = f.addNode(t)
	f.r = f.newReplica(t, window)
	return f
}

func adminClient(t *testing.T) kubernetes.Interface {
	t.Helper()
	rc := rest.CopyConfig(cp.Env(t).Config)
	rc.QPS, rc.Burst = 1000, 1000
	cs, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)
	return cs
}

// addNode creates an edge Node and its 40 s Lease renewed at the clock's
// now, and waits until the catalog has it.
func (f *fixture) addNode(t *testing.T) string {
	t.Helper()
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	name := "auto-" + hex.EncodeToString(b)
	ctx := t.Context()
	_, err := f.cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{catalog.DefaultEdgeLabel: ""}}}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.cs.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}) })
	secs, renew := int32(40), metav1.NewMicroTime(f.now)
	_, err = f.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: corev1.NamespaceNodeLease},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &name, LeaseDurationSeconds: &secs, RenewTime: &renew},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = f.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	require.Eventually(t, func() bool { _, ok := f.cat.Node(name); return ok }, 30*time.Second, 5*time.Millisecond)
	return name
}

// newReplica builds a controller on the fixture's catalog and clock.
func (f *fixture) newReplica(t *testing.T, window time.Duration, opts ...func(*Config)) *replica {
	t.Helper()
	r := &replica{sess: &sessions{}, reg: promtest.NewRegistry()}
	cfg := Config{
		Window: window, Trusted: func(string) bool { return f.trusted }, Now: func() time.Time { return f.now }, Registerer: r.reg,
		LeaderElection: leader.Config{Disabled: true},
	}
	for _, o := range opts {
		o(&cfg)
	}
	var err error
	r.c, err = New(f.cs, r.sess, f.cat, cfg)
	require.NoError(t, err)
	return r
}

// lead starts r's leader term (its Lease informer synced); it ends with
// the test or with the returned stop.
func (f *fixture) lead(t *testing.T, r *replica) (stop func()) {
	t.Helper()
	tm, stopTerm, err := r.c.startTerm(t.Context())
	require.NoError(t, err)
	r.term = tm
	stop = sync.OnceFunc(func() { r.term = nil; stopTerm() })
	t.Cleanup(stop)
	return stop
}

// settle waits until the catalog holds the API server's version of the
// fixture's Node and each leading replica's cache its Lease: what the
// next look decides on is what the last one wrote.
func (f *fixture) settle(t *testing.T, rs ...*replica) {
	t.Helper()
	n := f.getNode(t)
	l, err := f.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(t.Context(), f.node, metav1.GetOptions{})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		if c, ok := f.cat.Node(f.node); !ok || c.ResourceVersion != n.ResourceVersion {
			return false
		}
		for _, r := range rs {
			if r.term == nil {
				continue
			}
			if c, err := r.term.leases.Get(f.node); err != nil || c.ResourceVersion != l.ResourceVersion {
				return false
			}
		}
		return true
	}, 30*time.Second, 5*time.Millisecond, "the caches catch up with the API server")
}

// look has replica r (default the fixture's) look at the clock's now:
// its per-session half, then its leader half if it leads.
func (f *fixture) look(t *testing.T, rs ...*replica) {
	t.Helper()
	if len(rs) == 0 {
		rs = []*replica{f.r}
	}
	for _, r := range rs {
		f.settle(t, r)
		r.c.lookConnected(t.Context())
		if r.term != nil {
			f.settle(t, r)
			r.term.look(t.Context())
		}
	}
	f.settle(t, rs...)
}

// tick moves the clock by d and has the replicas look.
func (f *fixture) tick(t *testing.T, d time.Duration, rs ...*replica) {
	t.Helper()
	f.now = f.now.Add(d)
	f.look(t, rs...)
}

func (f *fixture) renewTime(t *testing.T) time.Time {
	t.Helper()
	l, err := f.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(t.Context(), f.node, metav1.GetOptions{})
	require.NoError(t, err)
	return l.Spec.RenewTime.Time
}

// renewAsEdge renews the Lease as the edge does through any replica
// (cloudcore/upstream: a patch, not conditional).
func (f *fixture) renewAsEdge(t *testing.T, at time.Time) {
	t.Helper()
	_, err := f.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Patch(t.Context(), f.node, types.MergePatchType,
		[]byte(`{"spec":{"holderIdentity":"`+f.node+`","renewTime":"`+at.UTC().Format(metav1.RFC3339Micro)+`"}}`), metav1.PatchOptions{})
	require.NoError(t, err)
}

// condition returns the TetherConnected condition (nil: none).
func (f *fixture) condition(t *testing.T) *corev1.NodeCondition {
	t.Helper()
	return conditionOf(f.getNode(t), ConditionType)
}

func (f *fixture) getNode(t *testing.T) *corev1.Node {
	t.Helper()
	n, err := f.cs.CoreV1().Nodes().Get(t.Context(), f.node, metav1.GetOptions{})
	require.NoError(t, err)
	return n
}

// tainted says whether the Node carries the offline taint.
func (f *fixture) tainted(t *testing.T) bool {
	t.Helper()
	return tainted(f.getNode(t))
}

// addTaint adds tt to the Node as another writer would (an update
// conditional on the version read).
func (f *fixture) addTaint(t *testing.T, tt corev1.Taint) {
	t.Helper()
	n := f.getNode(t)
	n.Spec.Taints = append(n.Spec.Taints, tt)
	_, err := f.cs.CoreV1().Nodes().Update(t.Context(), n, metav1.UpdateOptions{})
	require.NoError(t, err)
}

// requireConnected checks that the Node says the edge is connected:
// TetherConnected True/EdgeConnected and no offline taint.
func (f *fixture) requireConnected(t *testing.T) {
	t.Helper()
	c := f.condition(t)
	require.NotNil(t, c)
	require.Equal(t, corev1.ConditionTrue, c.Status)
	require.Equal(t, ReasonConnected, c.Reason)
	require.False(t, f.tainted(t), "a connected edge's Node has no offline taint")
}

// requireOffline checks that the Node says CloudCore stands in:
// TetherConnected False/EdgeDisconnected and the offline taint.
func (f *fixture) requireOffline(t *testing.T, msg string) {
	t.Helper()
	c := f.condition(t)
	require.NotNil(t, c, msg)
	require.Equal(t, corev1.ConditionFalse, c.Status, msg)
	require.Equal(t, ReasonDisconnected, c.Reason, msg)
	require.True(t, f.tainted(t), "%s: the offline taint", msg)
}

func (r *replica) renewals(t *testing.T) float64 {
	t.Helper()
	return promtest.Sum(t, r.reg, "tether_autonomy_lease_renewals_total", nil)
}

// TestOfflineRenewsUntilBack: a connected node's Node says so
// (TetherConnected True); once it has no session anywhere and its Lease
// has not moved for half its duration, the leader writes False/
// EdgeDisconnected, taints the Node offline:NoSchedule and renews the
// Lease every quarter of its duration; once back, the Node says True
// again, untainted, and the Lease is the edge's alone.
func TestOfflineRenewsUntilBack(t *testing.T) {
	f := newFixture(t, time.Hour)
	r := f.r
	f.lead(t, r)
	r.sess.set(f.node)
	f.tick(t, time.Second)
	f.requireConnected(t)
	start := f.renewTime(t)

	r.sess.set()
	f.tick(t, 19*time.Second) // 20 s after the edge's renewal: not yet
	require.Equal(t, start, f.renewTime(t), "a Lease half its duration old may still be the edge's")
	require.Equal(t, corev1.ConditionTrue, f.condition(t).Status)
	require.Equal(t, 0.0, promtest.Sum(t, r.reg, "tether_autonomy_offline_nodes", nil))

	f.tick(t, 2*time.Second)
	f.requireOffline(t, "no session anywhere")
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro(), "renewed at once")
	require.Equal(t, start.UTC().Format(time.RFC3339), f.condition(t).LastHeartbeatTime.UTC().Format(time.RFC3339), "last seen when it last renewed")
	require.Equal(t, 1.0, r.renewals(t))
	f.tick(t, 5*time.Second)
	require.Equal(t, 1.0, r.renewals(t), "not due")
	require.Equal(t, 1.0, promtest.Sum(t, r.reg, "tether_autonomy_offline_nodes", nil))
	f.tick(t, 5*time.Second)
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro(), "due: a quarter of 40 s")
	require.Equal(t, 2.0, r.renewals(t))

	r.sess.set(f.node)
	f.tick(t, 11*time.Second)
	f.requireOffline(t, "a session, but the edge has not renewed since CloudCore did")
	f.renewAsEdge(t, f.now)
	f.tick(t, time.Second)
	f.requireConnected(t)
	for range 3 {
		f.tick(t, 9*time.Second)
		f.renewAsEdge(t, f.now)
	}
	require.Equal(t, 2.0, r.renewals(t), "a connected edge renews its own Lease")
	require.Equal(t, 0.0, promtest.Sum(t, r.reg, "tether_autonomy_offline_nodes", nil))
}

// TestWindowExpires: past the window the leader stops renewing and says
// so; the taint stays until the edge is back.
func TestWindowExpires(t *testing.T) {
	f := newFixture(t, 40*time.Second)
	r := f.r
	f.lead(t, r)
	r.sess.set(f.node)
	f.tick(t, 0)
	r.sess.set()
	f.tick(t, 21*time.Second)
	f.requireOffline(t, "stood in")
	require.Equal(t, 1.0, r.renewals(t))
	f.tick(t, 10*time.Second)
	require.Equal(t, 2.0, r.renewals(t))
	f.tick(t, 10*time.Second) // 41 s since the edge was last seen
	require.Equal(t, 2.0, r.renewals(t), "no renewal past the window")
	c := f.condition(t)
	require.Equal(t, corev1.ConditionFalse, c.Status)
	require.Equal(t, ReasonExpired, c.Reason)
	require.True(t, f.tainted(t), "past the window the site is still offline: no new pods")
	f.tick(t, 20*time.Second)
	require.Equal(t, 2.0, r.renewals(t))

	r.sess.set(f.node)
	f.renewAsEdge(t, f.now)
	f.tick(t, time.Second)
	f.requireConnected(t)
}

// TestEdgeBackElsewhere: while the leader stands in, the edge comes back
// through another replica. Its renewals win (the leader's writes are
// conditional on the version it read, and it renews only a Lease a
// quarter old); that replica writes True and removes the taint; the
// leader stops standing in and never writes True itself.
func TestEdgeBackElsewhere(t *testing.T) {
	f := newFixture(t, time.Hour)
	leaderR, other := f.r, f.newReplica(t, time.Hour)
	f.lead(t, leaderR)
	leaderR.sess.set(f.node)
	f.tick(t, 0, leaderR, other)
	leaderR.sess.set()
	f.tick(t, 21*time.Second, leaderR, other)
	f.requireOffline(t, "stood in")

	// The edge reconnects to the other replica and renews; the leader's
	// cache has not seen it yet when it renews: conflict, the edge's
	// renewal stands.
	stale, err := leaderR.term.leases.Get(f.node)
	require.NoError(t, err)
	f.now = f.now.Add(11 * time.Second)
	f.renewAsEdge(t, f.now.Add(-time.Second))
	renewed, err := leaderR.c.renew(t.Context(), stale, f.now)
	require.NoError(t, err)
	require.False(t, renewed, "a write from a view older than the edge's renewal conflicts")
	require.Equal(t, f.now.Add(-time.Second).UnixMicro(), f.renewTime(t).UnixMicro(), "the edge's renewal stands")

	other.sess.set(f.node)
	f.look(t, other)
	f.requireConnected(t)
	before := leaderR.renewals(t)
	for range 4 {
		f.tick(t, 10*time.Second, leaderR, other)
		f.renewAsEdge(t, f.now)
		f.requireConnected(t)
	}
	require.Equal(t, before, leaderR.renewals(t), "the edge renews its own Lease")
	require.Equal(t, 0.0, promtest.Sum(t, leaderR.reg, "tether_autonomy_offline_nodes", nil))
}

// TestDeadSessionDoesNotUndo: a replica holds a session the edge no
// longer renews through (a dead peer its timeout has not yet caught); the
// leader, another replica, finds the Lease stale and stands in. The
// replica with the session does not take the leader's False and taint
// back until the edge renews its Lease again; then it does at once.
func TestDeadSessionDoesNotUndo(t *testing.T) {
	f := newFixture(t, time.Hour)
	holder, leaderR := f.r, f.newReplica(t, time.Hour)
	f.lead(t, leaderR)
	holder.sess.set(f.node)
	f.tick(t, time.Second, holder, leaderR)
	f.requireConnected(t)
	f.tick(t, 21*time.Second, holder, leaderR) // the edge went silent at the clock's start
	f.requireOffline(t, "the Lease is stale: no session anywhere that carries renewals")
	l, err := f.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(t.Context(), f.node, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, HolderStandIn, *l.Spec.HolderIdentity, "CloudCore's renewal says so")
	for range 3 {
		f.tick(t, 5*time.Second, holder, leaderR)
		f.requireOffline(t, "the replica with the dead session leaves the leader's writes")
	}
	f.renewAsEdge(t, f.now)
	f.tick(t, time.Second, holder, leaderR)
	f.requireConnected(t)
}

// TestTwoStandInsNeverSayConnected is the adoption race: two replicas
// both stand in for one offline node (two CloudCores restarted during an
// outage; or a leader whose term ended while its look was still writing,
// and its successor), their looks drifting so that each in turn finds a
// renewal the other wrote. Neither may write TetherConnected True or
// remove the taint: only a replica holding the edge's session does. (With
// main's controller the second of them read the other's renewal as "the
// edge renews through another replica" and wrote True and removed the
// taint, with the edge still offline.)
func TestTwoStandInsNeverSayConnected(t *testing.T) {
	f := newFixture(t, time.Hour)
	a, b := f.r, f.newReplica(t, time.Hour)
	f.lead(t, a)
	a.sess.set(f.node)
	f.tick(t, 0, a)
	a.sess.set()
	f.tick(t, 21*time.Second, a)
	f.requireOffline(t, "stood in")
	f.lead(t, b)
	for i := range 8 {
		order := []*replica{a, b}
		if i%2 == 1 {
			order = []*replica{b, a} // the replicas' looks drift: now one first, now the other
		}
		f.tick(t, 11*time.Second, order...)
		f.requireOffline(t, "two stand-ins, the edge still offline")
		require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro(), "the Lease is renewed (by one of them)")
	}
	require.Equal(t, 9.0, a.renewals(t)+b.renewals(t), "one renewal per due look, not two")
}

// TestLeaderTakesOver: the leader that stood in stops (killed: its term
// ends without a word); the next leader stands in from the Node and the
// Lease alone, the taint kept, and cleans up when the edge is back on its
// replica.
func TestLeaderTakesOver(t *testing.T) {
	f := newFixture(t, time.Hour)
	first := f.r
	stopFirst := f.lead(t, first)
	first.sess.set(f.node)
	f.tick(t, 0)
	first.sess.set()
	f.tick(t, 21*time.Second)
	f.requireOffline(t, "stood in")
	stopFirst()

	next := f.newReplica(t, time.Hour)
	f.tick(t, 9*time.Second, next)
	f.lead(t, next)
	f.tick(t, time.Second, next)
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro(), "the new leader renews")
	require.Equal(t, 1.0, promtest.Sum(t, next.reg, "tether_autonomy_offline_nodes", nil))
	f.requireOffline(t, "after the takeover")

	next.sess.set(f.node)
	f.renewAsEdge(t, f.now)
	f.tick(t, time.Second, next)
	f.requireConnected(t)

	// Offline longer than the window: a new leader does not stand in.
	late := f.newReplica(t, time.Minute)
	next.sess.set()
	f.tick(t, 30*time.Second, next) // stood in by next, whose term goes on
	f.requireOffline(t, "offline again")
	f.lead(t, late)
	renewed := f.renewTime(t)
	f.tick(t, 2*time.Minute, late)
	require.Equal(t, renewed, f.renewTime(t), "a node offline longer than the window is not stood in for")
	require.Equal(t, ReasonExpired, f.condition(t).Reason)
}

// TestNotTrusted: a node whose EdgeNode is gone or disallowed is not
// stood in for.
func TestNotTrusted(t *testing.T) {
	f := newFixture(t, time.Hour)
	f.lead(t, f.r)
	f.r.sess.set(f.node)
	f.tick(t, 0)
	f.trusted = false
	f.r.sess.set()
	f.tick(t, 30*time.Second)
	require.Equal(t, 0.0, f.r.renewals(t))
	require.Equal(t, corev1.ConditionTrue, f.condition(t).Status, "nothing is written for an untrusted node")
	require.False(t, f.tainted(t))
}

// TestNeverConnected: a node CloudCore never saw connected (no
// TetherConnected condition) is not its to renew.
func TestNeverConnected(t *testing.T) {
	f := newFixture(t, time.Hour)
	f.lead(t, f.r)
	f.tick(t, 30*time.Second)
	require.Equal(t, 0.0, f.r.renewals(t))
	require.Nil(t, f.condition(t))
}

// TestDisabled: a zero window makes Run return at once; a negative one is
// refused, and so is leader election without a namespace.
func TestDisabled(t *testing.T) {
	f := newFixture(t, 0)
	// After the fixture: its API calls may open connections (and their
	// goroutines) to the shared API server; Run must start none.
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	c, err := New(f.cs, &sessions{}, f.cat, Config{})
	require.NoError(t, err)
	require.NoError(t, c.Run(t.Context()))
	_, err = New(f.cs, &sessions{}, f.cat, Config{Window: -time.Second})
	require.ErrorContains(t, err, "negative window")
	_, err = New(f.cs, &sessions{}, f.cat, Config{Window: time.Hour})
	require.ErrorContains(t, err, "namespace")
	_, err = New(f.cs, &sessions{}, nil, Config{Window: time.Hour})
	require.ErrorContains(t, err, "Node cache")
}

// TestRunElects: Run campaigns on the Lease and stands in while it holds
// it (the leader gauge says so); a stopped Run releases the Lease and
// leaks no goroutine.
func TestRunElects(t *testing.T) {
	f := newFixture(t, time.Hour)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	name := "autonomy-" + f.node
	r := f.newReplica(t, time.Hour, func(c *Config) {
		c.Now, c.Period = time.Now, 50*time.Millisecond
		c.LeaderElection = leader.Config{Namespace: corev1.NamespaceDefault, Name: name, LeaseDuration: 4 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: 100 * time.Millisecond}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.c.Run(ctx) }()
	require.Eventually(t, func() bool { return promtest.Sum(t, r.reg, "tether_autonomy_leader", nil) == 1 }, 30*time.Second, 10*time.Millisecond)
	cancel()
	require.NoError(t, <-done)
	require.Equal(t, 0.0, promtest.Sum(t, r.reg, "tether_autonomy_leader", nil))
	l, err := f.cs.CoordinationV1().Leases(corev1.NamespaceDefault).Get(t.Context(), name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Empty(t, ptrString(l.Spec.HolderIdentity), "released")
	_ = f.cs.CoordinationV1().Leases(corev1.NamespaceDefault).Delete(context.Background(), name, metav1.DeleteOptions{})
}

func ptrString(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// countingTransport counts the requests of a client.
type countingTransport struct {
	n    *atomic.Int64
	next http.RoundTripper
}

func (c countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.next.RoundTrip(r)
}

// TestReconnectOfSettledNodesCostsNothing: a CloudCore restarted while
// its edges were connected (their Nodes say True, untainted) sees them
// all reconnect at once and makes no API request for them, neither read
// nor write, on any replica, leader or not. (Main's controller read every
// reconnecting node's Node, and listed all Nodes at its first look.)
func TestReconnectOfSettledNodesCostsNothing(t *testing.T) {
	f := newFixture(t, time.Hour)
	names := []string{f.node}
	for range 19 {
		names = append(names, f.addNode(t))
	}
	f.r.sess.set(names...)
	f.tick(t, time.Second)
	for _, name := range names {
		require.Eventually(t, func() bool { n, ok := f.cat.Node(name); return ok && connected(n) }, 30*time.Second, 5*time.Millisecond)
	}

	var requests atomic.Int64
	rc := rest.CopyConfig(cp.Env(t).Config)
	rc.QPS, rc.Burst = 1000, 1000
	rc.Wrap(func(rt http.RoundTripper) http.RoundTripper { return countingTransport{n: &requests, next: rt} })
	counted, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)
	for _, leads := range []bool{false, true} {
		restarted := &replica{sess: &sessions{}, reg: promtest.NewRegistry()}
		restarted.c, err = New(counted, restarted.sess, f.cat, Config{
			Window: time.Hour, Now: func() time.Time { return f.now }, LeaderElection: leader.Config{Disabled: true}, Registerer: restarted.reg,
		})
		require.NoError(t, err)
		if leads {
			f.lead(t, restarted) // its Lease informer's list and watch are the term's, not the reconnects'
		}
		before := requests.Load()
		restarted.sess.set(names...)
		for range 3 {
			f.tick(t, time.Second, restarted)
		}
		require.Zero(t, requests.Load()-before, "API requests for %d reconnects of settled nodes (leader %v)", len(names), leads)
	}
}

// TestTaintKeepsOthers: the offline taint is added and removed beside the
// taints of everyone else (the operator's, the node lifecycle
// controller's), through a write conditional on the Node's version: one
// from a stale view conflicts and is not made, and the next look, from the
// cache, makes it and loses nothing. An operator who removes the taint
// while the edge is offline is not fought.
func TestTaintKeepsOthers(t *testing.T) {
	f := newFixture(t, time.Hour)
	r := f.r
	f.lead(t, r)
	operator := corev1.Taint{Key: "example.com/site", Value: "shop-17", Effect: corev1.TaintEffectNoSchedule}
	f.addTaint(t, operator)
	others := func() []corev1.Taint { return slices.DeleteFunc(f.getNode(t).Spec.Taints, isOffline) }
	before := others()
	require.Contains(t, before, operator)

	r.sess.set(f.node)
	f.tick(t, 0)
	r.sess.set()
	f.tick(t, 21*time.Second)
	f.requireOffline(t, "stood in")
	require.Equal(t, before, others(), "adding the offline taint keeps the others")
	stale := f.getNode(t)

	later := corev1.Taint{Key: corev1.TaintNodeUnreachable, Effect: corev1.TaintEffectNoExecute}
	f.addTaint(t, later)
	before = others()
	err := r.c.setTaint(t.Context(), f.node, stale, false)
	require.True(t, apierrors.IsConflict(err), "a write from a stale view conflicts: %v", err)
	require.Equal(t, before, others(), "and writes nothing")
	f.settle(t, r)
	n, ok := f.cat.Node(f.node)
	require.True(t, ok)
	require.NoError(t, r.c.setTaint(t.Context(), f.node, n, false))
	require.False(t, f.tainted(t))
	require.Equal(t, before, others(), "removing the offline taint keeps the taints written since")

	// That removal stands for the operator's by hand: left so.
	failures := promtest.Sum(t, r.reg, "tether_autonomy_errors_total", nil)
	f.tick(t, 10*time.Second)
	require.False(t, f.tainted(t), "an offline taint the operator removed is not put back while the edge stays offline")

	// The edge is back; the Node changes just before the connected
	// look (its cache may still hold the older version: then its write
	// conflicts): the taint is gone by the next look.
	require.NoError(t, r.c.setTaint(t.Context(), f.node, f.getNode(t), true))
	r.sess.set(f.node)
	f.renewAsEdge(t, f.now)
	f.settle(t, r)
	f.addTaint(t, corev1.Taint{Key: "example.com/late", Effect: corev1.TaintEffectPreferNoSchedule})
	r.c.lookConnected(t.Context())
	f.tick(t, time.Second)
	f.requireConnected(t)
	require.Equal(t, failures, promtest.Sum(t, r.reg, "tether_autonomy_errors_total", nil), "a conflict decided again is no failure")
	require.Contains(t, others(), operator)
	require.Contains(t, others(), later)
}

// TestFailuresRateLogged: a write the API server refuses at every look (a
// CloudCore whose ServiceAccount may not write Node status) is counted
// every time and logged once a minute.
func TestFailuresRateLogged(t *testing.T) {
	f := newFixture(t, time.Hour)
	env := cp.Env(t)
	admin := f.cs
	sa := "autonomy-" + f.node
	_, err := admin.CoreV1().ServiceAccounts(corev1.NamespaceDefault).Create(t.Context(), &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = admin.CoreV1().ServiceAccounts(corev1.NamespaceDefault).Delete(context.Background(), sa, metav1.DeleteOptions{})
	})
	tok, err := admin.CoreV1().ServiceAccounts(corev1.NamespaceDefault).CreateToken(t.Context(), sa, &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	require.NoError(t, err)
	rc := rest.AnonymousClientConfig(env.Config)
	rc.BearerToken = tok.Status.Token
	refused, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)

	var logs bytes.Buffer
	reg := promtest.NewRegistry()
	c, err := New(refused, f.r.sess, f.cat, Config{
		Window: time.Hour, Now: func() time.Time { return f.now }, Registerer: reg, LeaderElection: leader.Config{Disabled: true},
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	require.NoError(t, err)
	f.r = &replica{c: c, sess: f.r.sess, reg: reg}
	f.r.sess.set(f.node)
	for range 5 {
		f.tick(t, time.Second)
	}
	require.Equal(t, 5.0, promtest.Sum(t, reg, "tether_autonomy_errors_total", nil))
	require.Equal(t, 1, strings.Count(logs.String(), "offline autonomy call failed"), "logged once: %s", logs.String())
	require.Contains(t, logs.String(), "forbidden")
	f.tick(t, time.Minute)
	require.Equal(t, 2, strings.Count(logs.String(), "offline autonomy call failed"), "and again a minute later")
	require.Contains(t, logs.String(), "suppressed=4")
	require.Nil(t, f.condition(t), "nothing written")
}
