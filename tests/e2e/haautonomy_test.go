package e2e

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/cloudcore/autonomy"
	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/netproxy"
)

// The timings of TestHAAutonomyFailover: the replicas' autonomy leader
// election, and the node lifecycle controller's grace period, above the
// longest gap between two renewals of the edge's Lease that a takeover
// allows (a quarter of the Lease before the kill, the election's Lease
// duration and retry period, one look) with room for a loaded machine.
const (
	haAutoLeaderLease   = 4 * time.Second
	haAutoLeaderRenew   = 3 * time.Second
	haAutoLeaderRetry   = 500 * time.Millisecond
	haAutoNodeLease     = 4 * time.Second
	haAutoMonitorGrace  = 12 * time.Second
	haAutoHoldAfterKill = 25 * time.Second
)

// connectedWatch records, once armed, every moment a Node says its edge
// is connected (TetherConnected True, or the offline taint gone): what a
// stand-in must never write while the edge is offline.
type connectedWatch struct {
	mu    sync.Mutex
	armed bool
	seen  []string
}

func watchConnected(t *testing.T, cs kubernetes.Interface, node string) *connectedWatch {
	t.Helper()
	w := &connectedWatch{}
	f := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + node }))
	saw := func(obj any) {
		n, ok := obj.(*corev1.Node)
		if !ok {
			return
		}
		c := conditionOf(n, autonomy.ConditionType)
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.armed && (c == nil || c.Status != corev1.ConditionFalse || !nodeTainted(n)) {
			w.seen = append(w.seen, fmt.Sprintf("%s resourceVersion %s: condition %+v, offline taint %v", time.Now().Format("15:04:05.000"), n.ResourceVersion, c, nodeTainted(n)))
		}
	}
	_, err := f.Core().V1().Nodes().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: saw, UpdateFunc: func(_, obj any) { saw(obj) }})
	require.NoError(t, err)
	stop := make(chan struct{})
	f.Start(stop)
	f.WaitForCacheSync(stop)
	t.Cleanup(func() { close(stop); f.Shutdown() })
	return w
}

func (w *connectedWatch) arm() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.armed = true
}

func (w *connectedWatch) violations() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.seen)
}

// TestHAAutonomyFailover: two CloudCore replicas (child processes) with
// offline autonomy, a real kube-controller-manager (node lifecycle and
// taint eviction) and a healthy Node beside the edge's, so that the
// controller would evict. The edge site is cut off (tests/netproxy): the
// Node says TetherConnected False and is tainted offline. The replica that
// stands in for it is SIGKILLed: the survivor takes over within the
// election's Lease duration and renews the edge's Lease; the killed
// replica comes back and does not stand in as well (one writer, never
// TetherConnected True while offline). All that time the Node stays
// Ready, is never tainted unreachable or not-ready, and its pod is never
// evicted. Once the path heals the Node says True again, untainted.
func TestHAAutonomyFailover(t *testing.T) {
	env := controlplane.Start(t, controlplane.WithControllerManager(controlplane.ControllerManager{NodeMonitorGracePeriod: haAutoMonitorGrace}))
	cs := adminClient(t, env.Config)
	ctx := klog.NewContext(t.Context(), logr.Discard())
	ns := env.Namespace(t)
	healthy := "ha-auto-healthy"
	createHealthyNode(t, cs, healthy)
	stopRenew := renewEverySecond(t, cs, healthy)
	defer stopRenew()

	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	require.NoError(t, os.WriteFile(kubeconfig, env.KubeConfig, 0o600))
	caName := fmt.Sprintf("ha-auto-ca-%x", rand.Uint32())
	rs := startReplicas(t, kubeconfig, caName, 2, 0, func(s *haSpec) {
		s.Autonomy = &haAutonomy{Window: time.Hour, Lease: "autonomy-" + caName, LeaseDuration: haAutoLeaderLease, RenewDeadline: haAutoLeaderRenew, RetryPeriod: haAutoLeaderRetry}
	})
	ca, err := onboard.EnsureCA(ctx, cs, onboard.DefaultCANamespace, caName, nil)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(env.Config)
	require.NoError(t, err)
	node := uniqueNode("edge-haauto")
	id := admitNode(t, edgenode.NewClient(dyn), ca, node)
	px := netproxy.Start(t, rs[0].spec.QUIC, netproxy.Options{})
	startEdge(t, id, dataDir(t, node), px.Addr().String(), edgeOptions{timings: haTimings, nodeStatus: nodestatus.Config{LeaseDuration: haAutoNodeLease, Now: time.Now}})
	getNode := func() (*corev1.Node, bool) {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		return n, err == nil
	}
	t.Cleanup(func() { _ = cs.CoreV1().Nodes().Delete(ctx, node, metav1.DeleteOptions{}) })
	require.Eventually(t, func() bool {
		n, ok := getNode()
		c := conditionOf(n, autonomy.ConditionType)
		return ok && readyOf(n) == corev1.ConditionTrue && c != nil && c.Status == corev1.ConditionTrue &&
			!slices.ContainsFunc(n.Spec.Taints, func(tt corev1.Taint) bool { return tt.Key == corev1.TaintNodeNotReady })
	}, 90*time.Second, 100*time.Millisecond, "the edge's Node is Ready, TetherConnected True, and the node lifecycle controller has removed its not-ready taints")
	pod := boundPod(t, cs, ns, node)
	w := watchOffline(t, cs, ns, node, pod)
	connected := watchConnected(t, cs, node)

	// The site is cut off; the leader stands in.
	px.Partition(true)
	begin := time.Now()
	require.Eventually(t, func() bool {
		n, ok := getNode()
		c := conditionOf(n, autonomy.ConditionType)
		return ok && c != nil && c.Status == corev1.ConditionFalse && c.Reason == autonomy.ReasonDisconnected && nodeTainted(n)
	}, 30*time.Second, 100*time.Millisecond, "the Node says TetherConnected False and is tainted offline")
	t.Logf("TetherConnected=False and tainted %s after the cut", time.Since(begin).Round(100*time.Millisecond))
	connected.arm()
	var standIn, survivor *replica
	require.Eventually(t, func() bool {
		standIn, survivor = nil, nil
		for _, r := range rs {
			switch r.metric("tether_autonomy_offline_nodes") {
			case 1:
				standIn = r
			case 0:
				survivor = r
			}
		}
		return standIn != nil && survivor != nil
	}, 30*time.Second, 100*time.Millisecond, "one replica stands in, the other does not")
	require.Equal(t, 1.0, standIn.metric("tether_autonomy_leader"), "the replica that stands in leads")

	// The replica standing in dies.
	standIn.kill()
	killed := time.Now()
	leases := cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	require.Eventually(t, func() bool {
		l, err := leases.Get(ctx, node, metav1.GetOptions{})
		return err == nil && l.Spec.RenewTime != nil && l.Spec.RenewTime.After(killed) && survivor.metric("tether_autonomy_offline_nodes") == 1
	}, haAutoLeaderLease+haAutoLeaderRetry+autonomy.DefaultPeriod+10*time.Second, 50*time.Millisecond,
		"the survivor renews the edge's Lease within the election's Lease duration, its retry period and a look (and slack for a loaded machine)")
	t.Logf("the survivor renewed the offline edge's Lease %s after the stand-in was killed (election Lease %s, retry %s)",
		time.Since(killed).Round(10*time.Millisecond), haAutoLeaderLease, haAutoLeaderRetry)

	hold := func(d time.Duration, what string) {
		t.Helper()
		var bad string
		if !assert.Never(t, func() bool {
			if v, _, _ := w.check(pod); len(v) > 0 {
				bad = strings.Join(v, "; ")
				return true
			}
			if v := connected.violations(); len(v) > 0 {
				bad = "the Node said connected: " + strings.Join(v, "; ")
				return true
			}
			return false
		}, d, 200*time.Millisecond) {
			t.Fatalf("%s: %s", what, bad)
		}
	}
	hold(haAutoHoldAfterKill-time.Since(killed), "after the stand-in was killed")
	t.Logf("Ready, not tainted by the node lifecycle controller, pod in place, %s after the kill (grace %s)", time.Since(killed).Round(100*time.Millisecond), haAutoMonitorGrace)

	// The killed replica returns: still one stand-in, and nobody says the
	// edge is connected.
	renewals := survivor.metric("tether_autonomy_lease_renewals_total")
	standIn.launch(t)
	standIn.waitReady(t)
	hold(10*time.Second, "after the killed replica returned")
	require.Equal(t, 0.0, standIn.metric("tether_autonomy_offline_nodes"), "the returned replica does not stand in")
	require.Equal(t, 1.0, survivor.metric("tether_autonomy_offline_nodes"))
	require.Greater(t, survivor.metric("tether_autonomy_lease_renewals_total"), renewals, "the survivor goes on renewing")

	// The path heals: the edge's session (on the returned replica) wins.
	px.Partition(false)
	healed := time.Now()
	require.Eventually(t, func() bool {
		n, ok := getNode()
		c := conditionOf(n, autonomy.ConditionType)
		return ok && c != nil && c.Status == corev1.ConditionTrue && c.Reason == autonomy.ReasonConnected && !nodeTainted(n) &&
			survivor.metric("tether_autonomy_offline_nodes") == 0
	}, 60*time.Second, 100*time.Millisecond, "back online: TetherConnected True, untainted, nobody stands in")
	t.Logf("TetherConnected=True and untainted %s after the path healed", time.Since(healed).Round(100*time.Millisecond))
	w.stop()
	v, tainted, evicted := w.check(pod)
	require.Empty(t, v)
	require.True(t, tainted, "the watch saw the offline taint")
	require.False(t, evicted, "no eviction event for the edge's pod")
}
