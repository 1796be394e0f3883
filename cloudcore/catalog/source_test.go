package catalog

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/tetheredge/tether/common/objsync"
)

// leaseSource is a Source of coordination.k8s.io Leases in one namespace,
// each bound to the node its holderIdentity names. It stands in for a
// custom resource bound to a node, which this repository does not define
// yet; a dynamic client and unstructured objects work the same way.
func leaseSource(cs kubernetes.Interface, ns string) Source {
	return Source{
		GroupVersionKind: coordinationv1.SchemeGroupVersion.WithKind("Lease"),
		ListerWatcher: &cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				return cs.CoordinationV1().Leases(ns).List(ctx, o)
			},
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				return cs.CoordinationV1().Leases(ns).Watch(ctx, o)
			},
		},
		Object: &coordinationv1.Lease{},
		NodeName: func(obj runtime.Object) string {
			if l, ok := obj.(*coordinationv1.Lease); ok && l.Spec.HolderIdentity != nil {
				return *l.Spec.HolderIdentity
			}
			return ""
		},
	}
}

func leaseKey(ns, name string) objsync.Key {
	return objsync.Key{Group: coordinationv1.GroupName, Kind: "Lease", Namespace: ns, Name: name}
}

func TestSource(t *testing.T) {
	env := cp.Env(t)
	cfg := restConfig(env)
	k := &cluster{t: t, cs: clientset(t, cfg), ns: env.Namespace(t)}
	ns, ctx := k.ns, context.Background()
	edgeA, edgeB := "edge-a-"+ns, "edge-b-"+ns
	k.node(edgeA, true)
	k.node(edgeB, true)
	leases := k.cs.CoordinationV1().Leases(ns)
	_, err := leases.Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "device"},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &edgeA},
	}, metav1.CreateOptions{})
	require.NoError(t, err)

	c, rec := startCatalog(t, cfg, Config{Sources: []Source{leaseSource(k.cs, ns)}})
	key := leaseKey(ns, "device")
	require.ElementsMatch(t, []objsync.Key{nodeKey(edgeA), key}, c.Keys(edgeA))
	require.False(t, c.Belongs(edgeB, key))

	obj, ok := c.Get(edgeA, key)
	require.True(t, ok)
	require.Equal(t, "coordination.k8s.io", obj.Resource.Group)
	require.Equal(t, "v1", obj.Resource.Version)
	var data map[string]any
	require.NoError(t, json.Unmarshal(obj.Data, &data))
	require.Equal(t, "coordination.k8s.io/v1", data["apiVersion"])
	require.Equal(t, "Lease", data["kind"])
	require.NotContains(t, data["metadata"], "managedFields")

	// Moving the object to another node notifies both.
	rec.reset()
	l, err := leases.Get(ctx, "device", metav1.GetOptions{})
	require.NoError(t, err)
	l.Spec.HolderIdentity = &edgeB
	_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	require.NoError(t, err)
	waitNotified(t, rec, edgeA, key)
	waitNotified(t, rec, edgeB, key)
	waitKeys(t, c, edgeB, nodeKey(edgeB), key)
	require.Equal(t, []objsync.Key{nodeKey(edgeA)}, c.Keys(edgeA))

	rec.reset()
	require.NoError(t, leases.Delete(ctx, "device", metav1.DeleteOptions{}))
	waitNotified(t, rec, edgeB, key)
	waitKeys(t, c, edgeB, nodeKey(edgeB))
}

func TestSourceValidation(t *testing.T) {
	good := leaseSource(nil, "ns")
	cases := map[string]func(s *Source){
		"no kind":           func(s *Source) { s.GroupVersionKind.Kind = "" },
		"no version":        func(s *Source) { s.GroupVersionKind.Version = "" },
		"no lister watcher": func(s *Source) { s.ListerWatcher = nil },
		"no object":         func(s *Source) { s.Object = nil },
		"no node name":      func(s *Source) { s.NodeName = nil },
		"built-in kind":     func(s *Source) { s.GroupVersionKind = schema.GroupVersionKind{Version: "v1", Kind: "Secret"} },
	}
	cs := clientset(t, restConfigNowhere())
	for name, breakIt := range cases {
		t.Run(name, func(t *testing.T) {
			s := good
			breakIt(&s)
			_, err := New(cs, Config{Sources: []Source{s}})
			require.ErrorIs(t, err, ErrInvalidConfig)
		})
	}
	_, err := New(cs, Config{Sources: []Source{good, good}})
	require.ErrorIs(t, err, ErrInvalidConfig, "the same kind twice")
	_, err = New(cs, Config{Sources: []Source{good}})
	require.NoError(t, err)
}
