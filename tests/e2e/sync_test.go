package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/catalog"
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

// TestSyncAndReconcile is the main scenario on one control plane:
// 1,000 objects reach their node only; offline changes cost what changed
// and no API reads; the same after a CloudCore restart.
func TestSyncAndReconcile(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	p := newPKI(t)
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

	addr := freeUDP(t)
	c := startCloud(t, env.Config, p, addr, testTimings)
	pathA, pathB := dbPath(t, nodeA), dbPath(t, nodeB)
	a := startEdge(t, nodeA, pathA, addr, p, testTimings, nil)
	b := startEdge(t, nodeB, pathB, addr, p, testTimings, nil)
	waitConverged(t, c.cat, a.st, nodeA, 1000)
	waitConverged(t, c.cat, b.st, nodeB, 23)
	n, err := a.st.Count(ctx)
	require.NoError(t, err)
	require.Equal(t, 1000, n)
	for key := range held(t, a.st) {
		_, isB := desired(c.cat, nodeB)[key]
		_, isA := desired(c.cat, nodeA)[key]
		require.True(t, isA, "edge-a holds only its own objects")
		_ = isB
	}
	bHeld := held(t, b.st)
	for key := range desired(c.cat, nodeA) {
		if _, shared := desired(c.cat, nodeB)[key]; shared {
			continue // the shared ConfigMap belongs to both
		}
		_, leaked := bHeld[key]
		require.False(t, leaked, "edge-b must not hold edge-a's objects")
	}

	// Offline: update 10, delete 5, create 5.
	offline := func(round int) {
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
	}
	reconnect := func(c *cloud, round int) {
		t.Helper()
		objects0 := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"})
		deletes0 := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "delete"}) + c.counter(t, "tether_sync_pruned_total", nil)
		bytesOut0 := c.counter(t, "tether_tunnel_bytes_total", map[string]string{"direction": "out"})
		bytesIn0 := c.counter(t, "tether_tunnel_bytes_total", map[string]string{"direction": "in"})
		reads0 := c.requests.reads.Load()
		a = startEdge(t, nodeA, pathA, addr, p, testTimings, nil)
		waitConverged(t, c.cat, a.st, nodeA, 1000)
		objects := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"}) - objects0
		deletes := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "delete"}) + c.counter(t, "tether_sync_pruned_total", nil) - deletes0
		down := c.counter(t, "tether_tunnel_bytes_total", map[string]string{"direction": "out"}) - bytesOut0
		up := c.counter(t, "tether_tunnel_bytes_total", map[string]string{"direction": "in"}) - bytesIn0
		t.Logf("round %d: reconnect sent %v objects and %v deletes; %v bytes down, %v bytes up (edge-b's traffic included)", round, objects, deletes, down, up)
		require.Equal(t, 15.0, objects, "10 updated + 5 created objects cross, nothing else")
		require.Equal(t, 5.0, deletes, "5 deleted objects are pruned")
		require.Zero(t, c.requests.reads.Load()-reads0, "a reconnect makes no LIST or GET")
	}

	a.stop()
	offline(0)
	reconnect(c, 0)

	// CloudCore restarts (its memory is gone) while the edge is away.
	a.stop()
	c.stop()
	offline(1)
	c = startCloud(t, env.Config, p, addr, testTimings)
	reconnect(c, 1)
	waitConverged(t, c.cat, b.st, nodeB, 23)

	// A reconnect with nothing changed moves no object.
	a.stop()
	objects0 := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"})
	a = startEdge(t, nodeA, pathA, addr, p, testTimings, nil)
	waitConverged(t, c.cat, a.st, nodeA, 1000)
	time.Sleep(200 * time.Millisecond) // let any stray message surface before counting
	require.Equal(t, objects0, c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"}))
}
