package catalog

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// benchPods is how many pods the benchmarked edge node runs. They are
// created on the real API server (a few seconds), so the catalog's caches
// hold exactly what a real cluster would give it.
const benchPods = 1000

// benchNode sets up one edge node with benchPods pods, each using a
// ConfigMap and a Secret out of 50 and a shared image pull secret, and
// returns a synced catalog.
func benchNode(b *testing.B) (*Catalog, string) {
	env := cp.Env(b)
	cfg := restConfig(env)
	k := &cluster{t: b, cs: clientset(b, cfg), ns: env.Namespace(b)}
	node := "edge-bench-" + k.ns
	k.node(node, true)
	k.secret("pull")
	for i := range 50 {
		k.configMap(fmt.Sprintf("cm-%d", i))
		k.secret(fmt.Sprintf("sec-%d", i))
	}
	begin := time.Now()
	var g errgroup.Group
	g.SetLimit(16)
	for i := range benchPods {
		g.Go(func() error {
			_, err := k.cs.CoreV1().Pods(k.ns).Create(context.Background(), &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pod-%d", i)},
				Spec: corev1.PodSpec{
					NodeName:         node,
					ImagePullSecrets: []corev1.LocalObjectReference{{Name: "pull"}},
					Containers: []corev1.Container{{
						Name: "app", Image: "example.invalid/app",
						Env: []corev1.EnvVar{cmEnv("C", fmt.Sprintf("cm-%d", i%50)), secretEnv("S", fmt.Sprintf("sec-%d", i%50), false)},
					}},
				},
			}, metav1.CreateOptions{})
			return err
		})
	}
	require.NoError(b, g.Wait())
	b.Logf("created %d pods in %s", benchPods, time.Since(begin).Round(time.Millisecond))

	begin = time.Now()
	c, _ := startCatalog(b, cfg, Config{})
	b.Logf("catalog synced in %s", time.Since(begin).Round(time.Millisecond))
	require.Len(b, c.Keys(node), 1+benchPods+101)
	return c, node
}

// BenchmarkKeys measures answering one edge node of benchPods pods from the
// caches, as on every reconnect: its whole key set, then also every object.
func BenchmarkKeys(b *testing.B) {
	c, node := benchNode(b)
	b.Run("KeysOnly", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if len(c.Keys(node)) == 0 {
				b.Fatal("no keys")
			}
		}
	})
	b.Run("WithGetAll", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			for _, key := range c.Keys(node) {
				if _, ok := c.Get(node, key); !ok {
					b.Fatalf("Get(%s) failed", key)
				}
			}
		}
	})
}
