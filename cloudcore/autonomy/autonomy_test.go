package autonomy

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

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

// fixture is a controller on the shared control plane with a clock the
// test moves, and one edge Node with a 40 s Lease renewed at the clock's
// start.
type fixture struct {
	c       *Controller
	cs      kubernetes.Interface
	sess    *sessions
	reg     *promtest.Registry
	now     time.Time
	node    string
	trusted bool
}

func newFixture(t *testing.T, window time.Duration) *fixture {
	t.Helper()
	rc := rest.CopyConfig(cp.Env(t).Config)
	rc.QPS, rc.Burst = 1000, 1000
	cs, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	f := &fixture{cs: cs, sess: &sessions{}, reg: promtest.NewRegistry(), now: time.Now().Truncate(time.Second), node: "auto-" + hex.EncodeToString(b), trusted: true}
	ctx := t.Context()
	_, err = cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: f.node}}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = cs.CoreV1().Nodes().Delete(context.Background(), f.node, metav1.DeleteOptions{}) })
	secs, renew := int32(40), metav1.NewMicroTime(f.now)
	_, err = cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: f.node, Namespace: corev1.NamespaceNodeLease},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &f.node, LeaseDurationSeconds: &secs, RenewTime: &renew},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Delete(context.Background(), f.node, metav1.DeleteOptions{})
	})
	f.c, err = New(cs, f.sess, Config{
		Window: window, Trusted: func(string) bool { return f.trusted }, Now: func() time.Time { return f.now }, Registerer: f.reg,
	})
	require.NoError(t, err)
	return f
}

// tick moves the clock by d and has the controller look.
func (f *fixture) tick(t *testing.T, d time.Duration) {
	f.now = f.now.Add(d)
	f.c.Tick(t.Context())
}

func (f *fixture) renewTime(t *testing.T) time.Time {
	t.Helper()
	l, err := f.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(t.Context(), f.node, metav1.GetOptions{})
	require.NoError(t, err)
	return l.Spec.RenewTime.Time
}

// condition returns the TetherConnected condition (nil: none).
func (f *fixture) condition(t *testing.T) *corev1.NodeCondition {
	t.Helper()
	n, err := f.cs.CoreV1().Nodes().Get(t.Context(), f.node, metav1.GetOptions{})
	require.NoError(t, err)
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == ConditionType {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// node reads the fixture's Node.
func (f *fixture) getNode(t *testing.T) *corev1.Node {
	t.Helper()
	n, err := f.cs.CoreV1().Nodes().Get(t.Context(), f.node, metav1.GetOptions{})
	require.NoError(t, err)
	return n
}

// tainted says whether the Node carries the offline taint.
func (f *fixture) tainted(t *testing.T) bool {
	t.Helper()
	return slices.ContainsFunc(f.getNode(t).Spec.Taints, func(tt corev1.Taint) bool { return tt.MatchTaint(&TaintOffline) })
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

func (f *fixture) renewals(t *testing.T) float64 {
	t.Helper()
	return promtest.Sum(t, f.reg, "tether_autonomy_lease_renewals_total", nil)
}

// TestOfflineRenewsUntilBack: a connected node's Node says so
// (TetherConnected True); once it loses its session its Lease is renewed
// every quarter of its duration, the condition is False/EdgeDisconnected
// and the Node is tainted offline:NoSchedule; once back, the condition is
// True, the taint is gone and CloudCore writes the Lease no more.
func TestOfflineRenewsUntilBack(t *testing.T) {
	f := newFixture(t, time.Hour)
	f.sess.set(f.node)
	f.tick(t, time.Second)
	f.requireConnected(t)
	start := f.renewTime(t)

	f.sess.set()
	f.tick(t, time.Second) // 2 s after the edge's renewal: not due
	require.Equal(t, start, f.renewTime(t), "a Lease renewed less than a quarter of its duration ago is left alone")
	c := f.condition(t)
	require.NotNil(t, c)
	require.Equal(t, corev1.ConditionFalse, c.Status)
	require.Equal(t, ReasonDisconnected, c.Reason)
	require.True(t, f.tainted(t), "no new pods for an offline edge")

	f.tick(t, 10*time.Second)
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro(), "due: renewed at the controller's now")
	require.Equal(t, 1.0, f.renewals(t))
	f.tick(t, 11*time.Second)
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro())
	require.Equal(t, 2.0, f.renewals(t))

	f.sess.set(f.node)
	f.tick(t, 11*time.Second)
	f.requireConnected(t)
	f.tick(t, 11*time.Second)
	require.Equal(t, 2.0, f.renewals(t), "a connected edge renews its own Lease")
}

// TestWindowExpires: past the window CloudCore stops renewing and says so.
func TestWindowExpires(t *testing.T) {
	f := newFixture(t, 30*time.Second)
	f.sess.set(f.node)
	f.tick(t, 0)
	f.sess.set()
	f.tick(t, 20*time.Second)
	require.Equal(t, 1.0, f.renewals(t))
	f.tick(t, 11*time.Second) // 31 s offline
	require.Equal(t, 1.0, f.renewals(t), "no renewal past the window")
	c := f.condition(t)
	require.Equal(t, corev1.ConditionFalse, c.Status)
	require.Equal(t, ReasonExpired, c.Reason)
	require.True(t, f.tainted(t), "past the window the site is still offline: no new pods")
	f.tick(t, 20*time.Second)
	require.Equal(t, 1.0, f.renewals(t))

	f.sess.set(f.node)
	f.tick(t, time.Second)
	f.requireConnected(t)
}

// TestOtherWriter: a Lease renewed by someone else (the edge through
// another replica) ends this replica's renewals: one writer at a time.
func TestOtherWriter(t *testing.T) {
	f := newFixture(t, time.Hour)
	f.sess.set(f.node)
	f.tick(t, 0)
	f.sess.set()
	f.tick(t, 10*time.Second)
	require.Equal(t, 1.0, f.renewals(t))

	leases := f.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	l, err := leases.Get(t.Context(), f.node, metav1.GetOptions{})
	require.NoError(t, err)
	other := metav1.NewMicroTime(f.now.Add(time.Second))
	l.Spec.RenewTime = &other
	_, err = leases.Update(t.Context(), l, metav1.UpdateOptions{})
	require.NoError(t, err)

	f.tick(t, 20*time.Second)
	f.tick(t, 20*time.Second)
	require.Equal(t, 1.0, f.renewals(t))
	require.Equal(t, other.UnixMicro(), f.renewTime(t).UnixMicro(), "the other writer's renewal stands")
	f.requireConnected(t) // in case this replica's offline writes landed after the other's
}

// TestNotTrusted: a node whose EdgeNode is gone or disallowed is not
// stood in for.
func TestNotTrusted(t *testing.T) {
	f := newFixture(t, time.Hour)
	f.sess.set(f.node)
	f.tick(t, 0)
	f.trusted = false
	f.sess.set()
	f.tick(t, 20*time.Second)
	require.Equal(t, 0.0, f.renewals(t))
	require.Equal(t, corev1.ConditionTrue, f.condition(t).Status, "nothing is written for an untrusted node")
	require.False(t, f.tainted(t))
}

// TestNeverConnected: a node this replica never had a session for is not
// its to renew.
func TestNeverConnected(t *testing.T) {
	f := newFixture(t, time.Hour)
	f.tick(t, 20*time.Second)
	require.Equal(t, 0.0, f.renewals(t))
	require.Nil(t, f.condition(t))
}

// TestDisabled: a zero window makes Run return at once; a negative one is
// refused.
func TestDisabled(t *testing.T) {
	f := newFixture(t, 0)
	// After the fixture: its API calls may open connections (and their
	// goroutines) to the shared API server; Run must start none.
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	require.NoError(t, f.c.Run(t.Context()))
	_, err := New(f.cs, f.sess, Config{Window: -time.Second})
	require.ErrorContains(t, err, "negative window")
}

// TestAdopt: a CloudCore started while a site is offline, its Node saying
// so, stands in for it within the window counted from the condition's
// lastHeartbeatTime, and not past it.
func TestAdopt(t *testing.T) {
	f := newFixture(t, time.Hour)
	f.sess.set(f.node)
	f.tick(t, 0)
	f.sess.set()
	f.tick(t, time.Second) // writes TetherConnected False and the taint
	require.Equal(t, ReasonDisconnected, f.condition(t).Reason)
	require.True(t, f.tainted(t))

	// A new controller (a restarted CloudCore) with no session for it.
	restartedSess := &sessions{}
	restarted, err := New(f.cs, restartedSess, Config{Window: time.Hour, Now: func() time.Time { return f.now }, Registerer: promtest.NewRegistry()})
	require.NoError(t, err)
	f.c = restarted
	f.tick(t, 10*time.Second)
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro(), "the adopted node's Lease is renewed")
	require.True(t, f.tainted(t), "the taint survives the restart")
	require.Equal(t, ReasonDisconnected, f.condition(t).Reason)

	// The edge comes back to the restarted CloudCore: it cleans up.
	restartedSess.set(f.node)
	f.tick(t, time.Second)
	f.requireConnected(t)
	restartedSess.set()
	f.tick(t, time.Second)
	require.True(t, f.tainted(t), "offline again: tainted again")
	f.c.Tick(t.Context()) // a CloudCore that finds its offline writes done

	late, err := New(f.cs, &sessions{}, Config{Window: time.Hour, Now: func() time.Time { return f.now }})
	require.NoError(t, err)
	f.c = late
	renewed := f.renewTime(t)
	f.tick(t, 2*time.Hour)
	require.Equal(t, renewed, f.renewTime(t), "a node offline longer than the window is not adopted")
}

// TestTaintKeepsOthers: the offline taint is added and removed beside the
// taints of everyone else (the operator's, the API server's not-ready
// taint, one the node lifecycle controller adds while the edge is
// offline), through a write conditional on the Node's version: one made
// from a stale read conflicts, is retried on a fresh read and loses
// nothing. An operator who removes the taint while the edge is offline is
// not fought.
func TestTaintKeepsOthers(t *testing.T) {
	f := newFixture(t, time.Hour)
	operator := corev1.Taint{Key: "example.com/site", Value: "shop-17", Effect: corev1.TaintEffectNoSchedule}
	f.addTaint(t, operator)
	others := func() []corev1.Taint {
		return slices.DeleteFunc(f.getNode(t).Spec.Taints, isOffline)
	}
	before := others()
	require.Contains(t, before, operator)

	f.sess.set(f.node)
	f.tick(t, 0)
	f.sess.set()
	f.tick(t, time.Second)
	require.True(t, f.tainted(t))
	require.Equal(t, before, others(), "adding the offline taint keeps the others")
	stale := f.getNode(t)

	later := corev1.Taint{Key: corev1.TaintNodeUnreachable, Effect: corev1.TaintEffectNoExecute}
	f.addTaint(t, later)
	before = others()
	// A write from a stale read (the Node before the lifecycle
	// controller's taint) conflicts and is made again from a fresh one.
	n := f.c.nodes[f.node]
	failures := promtest.Sum(t, f.reg, "tether_autonomy_errors_total", nil)
	f.c.taint(t.Context(), f.node, n, stale, false)
	require.False(t, f.tainted(t))
	require.Equal(t, before, others(), "removing the offline taint from a stale read keeps the taints written since")
	require.Equal(t, failures, promtest.Sum(t, f.reg, "tether_autonomy_errors_total", nil), "a conflict retried is no failure")
	f.c.taint(t.Context(), f.node, n, nil, true)
	require.True(t, f.tainted(t))
	require.Equal(t, before, others())

	// The operator removes it by hand: left so.
	cur := f.getNode(t)
	cur.Spec.Taints = slices.DeleteFunc(cur.Spec.Taints, isOffline)
	_, err := f.cs.CoreV1().Nodes().Update(t.Context(), cur, metav1.UpdateOptions{})
	require.NoError(t, err)
	f.tick(t, 10*time.Second)
	require.False(t, f.tainted(t), "an offline taint the operator removed is not put back while the edge stays offline")

	f.sess.set(f.node)
	f.tick(t, time.Second)
	f.requireConnected(t)
	require.Equal(t, before, others(), "the edge's return removes only the offline taint")
}

// TestFailuresRateLogged: a write that fails at every look (the Node was
// deleted while the edge is offline) is counted every time and logged
// once a minute.
func TestFailuresRateLogged(t *testing.T) {
	f := newFixture(t, time.Hour)
	var logs bytes.Buffer
	reg := promtest.NewRegistry()
	c, err := New(f.cs, f.sess, Config{
		Window: time.Hour, Now: func() time.Time { return f.now }, Registerer: reg,
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	require.NoError(t, err)
	f.c = c
	f.sess.set(f.node)
	f.tick(t, 0)
	require.NoError(t, f.cs.CoreV1().Nodes().Delete(t.Context(), f.node, metav1.DeleteOptions{}))
	f.sess.set()
	for range 5 {
		f.tick(t, time.Second)
	}
	require.Equal(t, 5.0, promtest.Sum(t, reg, "tether_autonomy_errors_total", nil))
	require.Equal(t, 1, strings.Count(logs.String(), "offline autonomy call failed"), "logged once: %s", logs.String())
	f.tick(t, time.Minute)
	require.Equal(t, 2, strings.Count(logs.String(), "offline autonomy call failed"), "and again a minute later")
	require.Contains(t, logs.String(), "suppressed=4")
}
