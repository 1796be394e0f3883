package hollow

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"

	"golang.org/x/sync/errgroup"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/upstream"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
)

// Workload is what every hollow edge holds besides its Node: a few pods
// bound to it, each mounting one ConfigMap shared by all.
type Workload struct {
	// Namespace of the pods and the ConfigMap. Required.
	Namespace string
	// ConfigMap is the shared ConfigMap's name. Default "shared".
	ConfigMap string
	// PodsPerEdge is how many pods each edge holds. Default 2.
	PodsPerEdge int
	// Parallel is how many objects are written at once. Default 64.
	Parallel int
}

func (w Workload) withDefaults() Workload {
	if w.ConfigMap == "" {
		w.ConfigMap = "shared"
	}
	if w.PodsPerEdge <= 0 {
		w.PodsPerEdge = 2
	}
	if w.Parallel <= 0 {
		w.Parallel = 64
	}
	return w
}

// Key is the shared ConfigMap's key in an edge store (Config.Watch).
func (w Workload) Key() objsync.Key {
	w = w.withDefaults()
	return objsync.Key{Kind: "ConfigMap", Namespace: w.Namespace, Name: w.ConfigMap}
}

// PerEdge is how many objects each edge holds: its Node, its pods and
// the shared ConfigMap.
func (w Workload) PerEdge() int { return 1 + w.withDefaults().PodsPerEdge + 1 }

// fastClient is a clientset for the harness's own writes.
func fastClient(cfg *rest.Config) (kubernetes.Interface, error) {
	fast := rest.CopyConfig(cfg)
	fast.QPS, fast.Burst = 2000, 4000
	cs, err := kubernetes.NewForConfig(fast)
	if err != nil {
		return nil, fmt.Errorf("build clientset: %w", err)
	}
	return cs, nil
}

// Create writes the shared ConfigMap (generation 0) and every edge's
// pods. Pods left by an earlier run are kept.
func (w Workload) Create(ctx context.Context, cfg *rest.Config, nodes []string) error {
	w = w.withDefaults()
	cs, err := fastClient(cfg)
	if err != nil {
		return err
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: w.ConfigMap, Namespace: w.Namespace}, Data: map[string]string{"generation": "0"}}
	if _, err := cs.CoreV1().ConfigMaps(w.Namespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create ConfigMap %s: %w", w.ConfigMap, err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(w.Parallel)
	for _, node := range nodes {
		for i := range w.PodsPerEdge {
			g.Go(func() error {
				_, err := cs.CoreV1().Pods(w.Namespace).Create(gctx, w.pod(node, i), metav1.CreateOptions{})
				if err != nil && !apierrors.IsAlreadyExists(err) {
					return fmt.Errorf("create pod of %s: %w", node, err)
				}
				return nil
			})
		}
	}
	return g.Wait()
}

func (w Workload) pod(node string, i int) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-p%d", node, i), Namespace: w.Namespace},
		Spec: corev1.PodSpec{
			NodeName: node,
			Containers: []corev1.Container{{
				Name: "main", Image: "busybox", Command: []string{"sleep", "infinity"},
				VolumeMounts: []corev1.VolumeMount{{Name: "shared", MountPath: "/etc/shared"}},
			}},
			Volumes: []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{
				ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: w.ConfigMap}},
			}}},
		},
	}
}

// Bump writes a new generation into the shared ConfigMap and returns
// when it sent the update (so that no edge can commit the change before
// that instant; fan-out latencies are measured from it).
func (w Workload) Bump(ctx context.Context, cfg *rest.Config, generation int) (time.Time, error) {
	w = w.withDefaults()
	cs, err := fastClient(cfg)
	if err != nil {
		return time.Time{}, err
	}
	cm, err := cs.CoreV1().ConfigMaps(w.Namespace).Get(ctx, w.ConfigMap, metav1.GetOptions{})
	if err != nil {
		return time.Time{}, fmt.Errorf("read ConfigMap %s: %w", w.ConfigMap, err)
	}
	cm.Data = map[string]string{"generation": strconv.Itoa(generation)}
	sent := time.Now()
	if _, err := cs.CoreV1().ConfigMaps(w.Namespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return time.Time{}, fmt.Errorf("update ConfigMap %s: %w", w.ConfigMap, err)
	}
	return sent, nil
}

// LeaseAges lists the nodes' Leases and returns, for each of nodes that
// has one, now minus its renewTime: how stale the heartbeat the node
// lifecycle controller sees is. Missing counts nodes without a Lease.
func LeaseAges(ctx context.Context, cfg *rest.Config, nodes []string) (ages []time.Duration, missing int, err error) {
	cs, err := fastClient(cfg)
	if err != nil {
		return nil, 0, err
	}
	list, err := cs.CoordinationV1().Leases(upstream.LeaseNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, 0, fmt.Errorf("list leases: %w", err)
	}
	now := time.Now()
	byName := make(map[string]*coordinationv1.Lease, len(list.Items))
	for i := range list.Items {
		byName[list.Items[i].Name] = &list.Items[i]
	}
	for _, n := range nodes {
		l, ok := byName[n]
		if !ok || l.Spec.RenewTime == nil {
			missing++
			continue
		}
		ages = append(ages, now.Sub(l.Spec.RenewTime.Time))
	}
	return ages, missing, nil
}

// Percentile returns the p-th percentile (0..100) of ds by the nearest
// rank, 0 for none.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p/100+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

// Check returns nil when st, node's store, holds exactly what the
// workload gives node: its Node, its pods and the shared ConfigMap at
// generation; otherwise an error that says what differs.
func (w Workload) Check(ctx context.Context, st *store.Store, node string, generation int) error {
	w = w.withDefaults()
	want := map[objsync.Key]bool{{Kind: "Node", Name: node}: true, w.Key(): true}
	for i := range w.PodsPerEdge {
		want[objsync.Key{Kind: "Pod", Namespace: w.Namespace, Name: fmt.Sprintf("%s-p%d", node, i)}] = true
	}
	for k := range want {
		o, ok, err := st.Get(ctx, k)
		switch {
		case err != nil:
			return fmt.Errorf("read %s of %s: %w", k, node, err)
		case !ok:
			return fmt.Errorf("%s holds no %s", node, k)
		case k == w.Key():
			var cm corev1.ConfigMap
			if err := json.Unmarshal(o.Data, &cm); err != nil {
				return fmt.Errorf("decode %s of %s: %w", k, node, err)
			}
			if got := cm.Data["generation"]; got != strconv.Itoa(generation) {
				return fmt.Errorf("%s holds %s at generation %s, want %d", node, k, got, generation)
			}
		}
	}
	n, err := st.Count(ctx)
	if err != nil {
		return fmt.Errorf("count the objects of %s: %w", node, err)
	}
	if n != len(want) {
		return fmt.Errorf("%s holds %d objects, want %d", node, n, len(want))
	}
	return nil
}

// EnsureNamespace creates namespace if it does not exist.
func EnsureNamespace(ctx context.Context, cfg *rest.Config, namespace string) error {
	cs, err := fastClient(cfg)
	if err != nil {
		return err
	}
	_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", namespace, err)
	}
	return nil
}
