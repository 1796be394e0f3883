package catalog

import (
	"context"
	"net/http"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/testlog"
)

// cp is the real etcd and kube-apiserver all tests of this package share.
var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

const (
	waitFor = 30 * time.Second // informer propagation; generous under -race
	tick    = 10 * time.Millisecond
)

// restConfig returns a copy of the control plane's config without client
// rate limiting, for tests that create many objects.
func restConfig(env *controlplane.Env) *rest.Config {
	cfg := rest.CopyConfig(env.Config)
	cfg.QPS, cfg.Burst = 1000, 1000
	return cfg
}

func clientset(tb testing.TB, cfg *rest.Config) kubernetes.Interface {
	tb.Helper()
	cs, err := kubernetes.NewForConfig(cfg)
	require.NoError(tb, err)
	return cs
}

// startCatalog builds a catalog on cfg, subscribes a recorder, runs it
// until the test ends and waits for it to sync.
func startCatalog(tb testing.TB, cfg *rest.Config, ccfg Config) (*Catalog, *recorder) {
	tb.Helper()
	if ccfg.Logger == nil {
		ccfg.Logger = testlog.New()
	}
	c, err := New(clientset(tb, cfg), ccfg)
	require.NoError(tb, err)
	rec := &recorder{seen: make(map[note]int)}
	c.Subscribe(rec.record)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(tb, err)
		case <-time.After(waitFor):
			tb.Errorf("Run did not return %s after its context ended", waitFor)
		}
	})

	sctx, scancel := context.WithTimeout(ctx, waitFor)
	defer scancel()
	require.NoError(tb, c.WaitForSync(sctx))
	return c, rec
}

// recorder is a subscriber that remembers every notification.
type recorder struct {
	mu   sync.Mutex
	seen map[note]int
}

func (r *recorder) record(node string, key objsync.Key) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen[note{node, key}]++
}

func (r *recorder) count(node string, key objsync.Key) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen[note{node, key}]
}

// forNode returns the keys notified for node.
func (r *recorder) forNode(node string) []objsync.Key {
	r.mu.Lock()
	defer r.mu.Unlock()
	var keys []objsync.Key
	for n := range r.seen {
		if n.node == node {
			keys = append(keys, n.key)
		}
	}
	return keys
}

func (r *recorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.seen)
}

// waitNotified waits until every key has been notified for node since the
// last reset.
func waitNotified(t *testing.T, rec *recorder, node string, keys ...objsync.Key) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, k := range keys {
			if rec.count(node, k) == 0 {
				return false
			}
		}
		return true
	}, waitFor, tick, "node %s not notified of all of %v; got %v", node, keys, rec.forNode(node))
}

// waitKeys waits until Keys(node) is exactly want, in any order.
func waitKeys(t *testing.T, c *Catalog, node string, want ...objsync.Key) {
	t.Helper()
	want = sorted(want)
	require.Eventually(t, func() bool {
		return slices.Equal(sorted(c.Keys(node)), want)
	}, waitFor, tick, "Keys(%s) never became %v; last %v", node, want, sorted(c.Keys(node)))
}

func sorted(keys []objsync.Key) []objsync.Key {
	keys = slices.Clone(keys)
	slices.SortFunc(keys, compareKeys)
	return keys
}

func nodeKey(name string) objsync.Key { return objsync.Key{Kind: kindNode, Name: name} }

func podKey(ns, name string) objsync.Key {
	return objsync.Key{Kind: kindPod, Namespace: ns, Name: name}
}

func cmKey(ns, name string) objsync.Key {
	return objsync.Key{Kind: kindConfigMap, Namespace: ns, Name: name}
}

func secretKey(ns, name string) objsync.Key {
	return objsync.Key{Kind: kindSecret, Namespace: ns, Name: name}
}

// cluster creates and removes test objects through the API server.
type cluster struct {
	t  testing.TB
	cs kubernetes.Interface
	ns string
}

func (k *cluster) node(name string, edge bool) {
	k.t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if edge {
		n.Labels = map[string]string{DefaultEdgeLabel: ""}
	}
	_, err := k.cs.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{})
	require.NoError(k.t, err)
	k.t.Cleanup(func() {
		_ = k.cs.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

func (k *cluster) configMap(name string) *corev1.ConfigMap {
	k.t.Helper()
	cm, err := k.cs.CoreV1().ConfigMaps(k.ns).Create(context.Background(), &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Data:       map[string]string{"k": "v"},
	}, metav1.CreateOptions{})
	require.NoError(k.t, err)
	return cm
}

func (k *cluster) secret(name string) *corev1.Secret {
	k.t.Helper()
	s, err := k.cs.CoreV1().Secrets(k.ns).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Data:       map[string][]byte{"k": []byte("secret " + name)},
	}, metav1.CreateOptions{})
	require.NoError(k.t, err)
	return s
}

// pod creates a pod bound to node ("" for unscheduled) with spec's
// references; its one container is added here.
func (k *cluster) pod(name, node string, spec corev1.PodSpec) *corev1.Pod {
	k.t.Helper()
	spec.NodeName = node
	if len(spec.Containers) == 0 {
		spec.Containers = []corev1.Container{{Name: "app", Image: "example.invalid/app"}}
	}
	p, err := k.cs.CoreV1().Pods(k.ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       spec,
	}, metav1.CreateOptions{})
	require.NoError(k.t, err)
	return p
}

// deletePod deletes a pod at once: with no kubelet to confirm, a bound pod
// would otherwise stay terminating.
func (k *cluster) deletePod(name string) {
	k.t.Helper()
	err := k.cs.CoreV1().Pods(k.ns).Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
	require.NoError(k.t, err)
}

// requestLog records every request made by a client whose rest.Config was
// wrapped with wrap.
type requestLog struct {
	mu   sync.Mutex
	reqs []string
}

func (l *requestLog) wrap(next http.RoundTripper) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		l.mu.Lock()
		l.reqs = append(l.reqs, r.Method+" "+r.URL.RequestURI())
		l.mu.Unlock()
		return next.RoundTrip(r)
	})
}

func (l *requestLog) requests() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.reqs)
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
