package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/testlog"
)

// uniqueNode returns prefix with a random suffix.
func uniqueNode(prefix string) string {
	return fmt.Sprintf("%s-%x", prefix, rand.Uint32())
}

func freeUDP(t testing.TB) string {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := c.LocalAddr().String()
	require.NoError(t, c.Close())
	return addr
}

func adminClient(t testing.TB, cfg *rest.Config) kubernetes.Interface {
	c := rest.CopyConfig(cfg)
	c.QPS, c.Burst = 2000, 2000
	cs, err := kubernetes.NewForConfig(c)
	require.NoError(t, err)
	return cs
}

func createEdgeNode(t testing.TB, cs kubernetes.Interface, name string) {
	_, err := cs.CoreV1().Nodes().Create(context.Background(), &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{catalog.DefaultEdgeLabel: ""}},
	}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
	t.Cleanup(func() { _ = cs.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}) })
}

func podFor(ns, name, node string, refs ...string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": "e2e"}},
		Spec: corev1.PodSpec{
			NodeName:   node,
			Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/app:1"}},
		},
	}
	for _, r := range refs {
		p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: r, VolumeSource: corev1.VolumeSource{
			ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: r}},
		}})
	}
	return p
}

// createPods creates n pods named prefix-i on node, concurrently.
func createPods(t *testing.T, cs kubernetes.Interface, ns, prefix, node string, from, n int, refs ...string) {
	t.Helper()
	var g errgroup.Group
	g.SetLimit(32)
	for i := from; i < from+n; i++ {
		g.Go(func() error {
			_, err := cs.CoreV1().Pods(ns).Create(context.Background(), podFor(ns, fmt.Sprintf("%s-%04d", prefix, i), node, refs...), metav1.CreateOptions{})
			return err
		})
	}
	require.NoError(t, g.Wait())
}

// podKeys returns the keys of pods prefix-from .. prefix-(from+n-1).
func podKeys(ns, prefix string, from, n int) []objsync.Key {
	keys := make([]objsync.Key, n)
	for i := range keys {
		keys[i] = objsync.Key{Kind: "Pod", Namespace: ns, Name: fmt.Sprintf("%s-%04d", prefix, from+i)}
	}
	return keys
}

// storeContents opens the store in dataDir while no edge runs on it and
// returns what it holds: key hash -> version hash.
func storeContents(tb testing.TB, dataDir string) map[uint64]uint64 {
	tb.Helper()
	st, err := store.Open(context.Background(), storePath(dataDir), testlog.New())
	require.NoError(tb, err)
	defer func() { require.NoError(tb, st.Close()) }()
	return held(tb, st)
}

// requireDiff fails tb unless going from before to after changed (added
// or gave a new version to) exactly the keys changed and removed exactly
// the keys removed.
func requireDiff(tb testing.TB, before, after map[uint64]uint64, changed, removed []objsync.Key) {
	tb.Helper()
	hashes := func(keys []objsync.Key) []uint64 {
		var out []uint64
		for _, k := range keys {
			out = append(out, k.Hash())
		}
		slices.Sort(out)
		return out
	}
	var gotChanged, gotRemoved []uint64
	for k, v := range after {
		if w, ok := before[k]; !ok || w != v {
			gotChanged = append(gotChanged, k)
		}
	}
	for k := range before {
		if _, ok := after[k]; !ok {
			gotRemoved = append(gotRemoved, k)
		}
	}
	slices.Sort(gotChanged)
	slices.Sort(gotRemoved)
	require.Equal(tb, hashes(changed), gotChanged, "the objects the edge got anew are exactly those changed while it was away")
	require.Equal(tb, hashes(removed), gotRemoved, "the objects the edge removed are exactly those deleted while it was away")
}

// TestSyncAndReconcile is the main scenario on one control plane:
// 1,000 objects reach their node only; offline changes cost what changed
// and no API reads; the same after a CloudCore restart; a reconnect with
// nothing changed sends nothing.
func TestSyncAndReconcile(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	// Node names are unique per run: without a controller manager the
	// namespaces of earlier runs are never emptied, and their pods would
	// still be bound to a reused name.
	nodeA, nodeB := uniqueNode("edge-a"), uniqueNode("edge-b")
	createEdgeNode(t, cs, nodeA)
	createEdgeNode(t, cs, nodeB)
	_, err := cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "shared"}, Data: map[string]string{"k": "v"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "b-only"}, Data: map[string]string{"k": "v"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	// 998 pods + the shared ConfigMap + the Node = 1,000 objects for edge-a.
	createPods(t, cs, ns, "a", nodeA, 0, 998, "shared")
	createPods(t, cs, ns, "b", nodeB, 0, 20, "shared", "b-only")
	// What each edge must hold, from what the test created rather than
	// from the catalog under test.
	shared := objsync.Key{Kind: "ConfigMap", Namespace: ns, Name: "shared"}
	keysA := append(podKeys(ns, "a", 0, 998), shared, objsync.Key{Kind: "Node", Name: nodeA})
	keysB := append(podKeys(ns, "b", 0, 20), shared, objsync.Key{Kind: "ConfigMap", Namespace: ns, Name: "b-only"}, objsync.Key{Kind: "Node", Name: nodeB})

	opts := cloudOptions{quicAddr: freeUDP(t), timings: testTimings}
	c := startCloud(t, env.Config, opts)
	idA, idB := c.admit(t, nodeA), c.admit(t, nodeB)
	dirA, dirB := dataDir(t, nodeA), dataDir(t, nodeB)
	edgeOpts := edgeOptions{timings: testTimings}
	a := startEdge(t, idA, dirA, c.addr, edgeOpts)
	b := startEdge(t, idB, dirB, c.addr, edgeOpts)
	waitConverged(t, c.cat, a.st, nodeA, 1000)
	waitConverged(t, c.cat, b.st, nodeB, 23)
	requireKeys(t, a.st, keysA)
	requireKeys(t, b.st, keysB)

	// Offline: update 10, delete 5, create 5.
	type change struct{ changed, removed []objsync.Key }
	offline := func(round int) change {
		for i := range 10 {
			name := fmt.Sprintf("a-%04d", 100+round*50+i)
			pod, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			require.NoError(t, err)
			pod.Labels["round"] = fmt.Sprint(round)
			_, err = cs.CoreV1().Pods(ns).Update(ctx, pod, metav1.UpdateOptions{})
			require.NoError(t, err)
		}
		for i := range 5 {
			require.NoError(t, cs.CoreV1().Pods(ns).Delete(ctx, fmt.Sprintf("a-%04d", 500+round*50+i), metav1.DeleteOptions{GracePeriodSeconds: new(int64)}))
		}
		createPods(t, cs, ns, "a", nodeA, 2000+round*10, 5, "shared")
		return change{
			changed: append(podKeys(ns, "a", 100+round*50, 10), podKeys(ns, "a", 2000+round*10, 5)...),
			removed: podKeys(ns, "a", 500+round*50, 5),
		}
	}
	// barrier changes pod a-0000, which nothing else touches, after the
	// reconcile, and waits until edge-a holds the new version. The cloud
	// sends each node's changes in the order it queued them, so once the
	// barrier is there, whatever the reconcile queued has been sent: a
	// condition to count on, where waiting "long enough" would be a guess.
	barrierKey := objsync.Key{Kind: "Pod", Namespace: ns, Name: "a-0000"}
	barriers := 0
	barrier := func() {
		t.Helper()
		barriers++
		patched, err := cs.CoreV1().Pods(ns).Patch(ctx, barrierKey.Name, types.MergePatchType,
			fmt.Appendf(nil, `{"metadata":{"labels":{"barrier":"%d"}}}`, barriers), metav1.PatchOptions{})
		require.NoError(t, err)
		require.Eventually(t, func() bool {
			o, ok, err := a.st.Get(ctx, barrierKey)
			return err == nil && ok && o.Version == patched.ResourceVersion
		}, 30*time.Second, 10*time.Millisecond, "the barrier reaches the edge")
	}
	// reconnect starts edge-a again on its store; once the cloud has
	// finished reconciles in all (edge-b's included after a cloud
	// restart), the edge matches the catalog, a barrier has passed and the
	// edge has applied every event the cloud sent, it checks that exactly
	// what changed crossed (and the barrier), with no API read.
	reconnect := func(c *cloud, dones float64, ch change) {
		t.Helper()
		ch.changed = append(ch.changed, barrierKey)
		before := storeContents(t, dirA)
		objects0 := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"})
		deleteEvents0 := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "delete"})
		pruned0 := c.counter(t, "tether_sync_pruned_total", nil)
		bytesOut0 := c.counter(t, "tether_tunnel_bytes_total", map[string]string{"direction": "out"})
		bytesIn0 := c.counter(t, "tether_tunnel_bytes_total", map[string]string{"direction": "in"})
		reads0 := c.requests.total()
		appliedB0 := b.applied(t)
		a = startEdge(t, idA, dirA, c.addr, edgeOpts)
		c.waitDones(t, dones)
		waitConverged(t, c.cat, a.st, nodeA, 1000)
		barrier()
		sent := func() float64 {
			return c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"}) - objects0 +
				c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "delete"}) - deleteEvents0
		}
		a.applied(t) // fails at once if the metric is gone
		require.Eventually(t, func() bool {
			sentObjects, err1 := promtest.Value(c.reg, "tether_sync_messages_sent_total", map[string]string{"kind": "object"})
			sentDeletes, err2 := promtest.Value(c.reg, "tether_sync_messages_sent_total", map[string]string{"kind": "delete"})
			appliedA, err3 := promtest.Value(a.reg, "tether_edge_events_applied_total", nil)
			appliedB, err4 := promtest.Value(b.reg, "tether_edge_events_applied_total", nil)
			return err1 == nil && err2 == nil && err3 == nil && err4 == nil &&
				appliedA+appliedB-appliedB0 == sentObjects-objects0+sentDeletes-deleteEvents0
		}, 30*time.Second, 10*time.Millisecond, "the edges apply every event the cloud sent")
		objects := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"}) - objects0
		deletes := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "delete"}) - deleteEvents0 +
			c.counter(t, "tether_sync_pruned_total", nil) - pruned0
		down := c.counter(t, "tether_tunnel_bytes_total", map[string]string{"direction": "out"}) - bytesOut0
		up := c.counter(t, "tether_tunnel_bytes_total", map[string]string{"direction": "in"}) - bytesIn0
		t.Logf("reconnect sent %v objects and %v deletes; %v bytes down, %v bytes up (edge-b's traffic included)", objects, deletes, down, up)
		require.Equal(t, float64(len(ch.changed)), objects, "the objects changed while away (and the barrier) cross, nothing else")
		require.Equal(t, float64(len(ch.removed)), deletes, "the objects deleted while away are pruned, nothing else")
		require.Equal(t, sent(), a.applied(t), "edge-a applied each event once; edge-b got none")
		require.Zero(t, c.requests.total()-reads0, "a reconnect makes no LIST or GET, and no watch that lists: %s", describe(c.requests.since(reads0)))
		requireDiff(t, before, held(t, a.st), ch.changed, ch.removed)
		requireKeys(t, b.st, keysB)
	}

	a.stop()
	ch := offline(0)
	reconnect(c, c.dones(t)+1, ch)

	// CloudCore restarts (its memory is gone) while the edge is away; the
	// new cloud finishes two reconciles: edge-b's and edge-a's.
	a.stop()
	c.stop()
	ch = offline(1)
	c = startCloud(t, env.Config, opts)
	reconnect(c, 2, ch)
	waitConverged(t, c.cat, b.st, nodeB, 23)

	// A reconnect with nothing changed moves no object but the barrier.
	a.stop()
	reconnect(c, c.dones(t)+1, change{})
	require.Equal(t, 1.0, a.applied(t), "an unchanged edge applies nothing but the barrier")
}
