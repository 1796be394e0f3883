package autonomy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
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

func (f *fixture) renewals(t *testing.T) float64 {
	t.Helper()
	return promtest.Sum(t, f.reg, "tether_autonomy_lease_renewals_total", nil)
}

// TestOfflineRenewsUntilBack: a node seen connected that loses its session
// gets its Lease renewed every quarter of its duration, and the condition
// False/EdgeDisconnected; once back, the condition is True and CloudCore
// writes the Lease no more.
func TestOfflineRenewsUntilBack(t *testing.T) {
	f := newFixture(t, time.Hour)
	f.sess.set(f.node)
	f.tick(t, time.Second)
	require.Nil(t, f.condition(t), "nothing is written for a connected node that was never offline")
	start := f.renewTime(t)

	f.sess.set()
	f.tick(t, time.Second) // 2 s after the edge's renewal: not due
	require.Equal(t, start, f.renewTime(t), "a Lease renewed less than a quarter of its duration ago is left alone")
	c := f.condition(t)
	require.NotNil(t, c)
	require.Equal(t, corev1.ConditionFalse, c.Status)
	require.Equal(t, ReasonDisconnected, c.Reason)

	f.tick(t, 10*time.Second)
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro(), "due: renewed at the controller's now")
	require.Equal(t, 1.0, f.renewals(t))
	f.tick(t, 11*time.Second)
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro())
	require.Equal(t, 2.0, f.renewals(t))

	f.sess.set(f.node)
	f.tick(t, 11*time.Second)
	c = f.condition(t)
	require.Equal(t, corev1.ConditionTrue, c.Status)
	require.Equal(t, ReasonConnected, c.Reason)
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
	f.tick(t, 20*time.Second)
	require.Equal(t, 1.0, f.renewals(t))
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
	require.Nil(t, f.condition(t))
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
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	f := newFixture(t, 0)
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
	f.tick(t, time.Second) // writes TetherConnected False
	require.Equal(t, ReasonDisconnected, f.condition(t).Reason)

	// A new controller (a restarted CloudCore) with no session for it.
	restarted, err := New(f.cs, &sessions{}, Config{Window: time.Hour, Now: func() time.Time { return f.now }, Registerer: promtest.NewRegistry()})
	require.NoError(t, err)
	f.c = restarted
	f.tick(t, 10*time.Second)
	require.Equal(t, f.now.UnixMicro(), f.renewTime(t).UnixMicro(), "the adopted node's Lease is renewed")

	late, err := New(f.cs, &sessions{}, Config{Window: time.Hour, Now: func() time.Time { return f.now }})
	require.NoError(t, err)
	f.c = late
	renewed := f.renewTime(t)
	f.tick(t, 2*time.Hour)
	require.Equal(t, renewed, f.renewTime(t), "a node offline longer than the window is not adopted")
}
