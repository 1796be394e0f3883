// Package catalog knows which Kubernetes objects each edge node must hold:
// the edge Node itself, the Pods bound to it, the ConfigMaps and Secrets
// those Pods reference (and only those: an edge never gets a Secret its pods
// do not use), and objects of further kinds bound to one node (Source).
//
// It watches the API server with shared informers and answers Keys, Get and
// Belongs from their caches and its own reference counts, so an edge that
// connects or reconnects costs the API server nothing. Subscribers are told
// which (node, key) may have changed and read the current state back; the
// catalog itself sends nothing to edges, keeps no history and never writes to
// the API server.
//
// The API server must let the catalog's client list and watch nodes, pods,
// configmaps and secrets in all namespaces, and whatever each Source lists.
//
// Memory: Nodes are watched with the edge label selector, so only edge
// nodes are cached. Pods are watched with spec.nodeName!=, so unscheduled
// pods are not, but the pods of non-edge nodes are (no selector can name
// "pods of nodes carrying a label"), and so are their references in the
// counts, which lets a node that gains the label be served at once.
// ConfigMaps and Secrets are cached cluster-wide, including those no edge
// pod references, because a watch cannot select objects by who references
// them. Every cached object has its managedFields and kubectl last-applied
// annotation dropped. A cluster with large or numerous Secrets and Pods
// unrelated to edges pays for them here; the remedy, if it matters, is
// namespace-scoped informers for the namespaces edge pods use.
package catalog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/tetheredge/tether/common/objsync"
)

// DefaultEdgeLabel is the label that marks a Node as an edge node when
// Config.EdgeLabel is empty.
const DefaultEdgeLabel = "node-role.tether.dev/edge"

// Errors returned by New and Run.
var (
	// ErrInvalidConfig is wrapped by every error New returns for a bad
	// Config or client.
	ErrInvalidConfig = errors.New("catalog: invalid config")
	// ErrAlreadyStarted is returned by a second call of Run.
	ErrAlreadyStarted = errors.New("catalog: already started")
)

// Config configures a Catalog.
type Config struct {
	// EdgeLabel is the label key that marks a Node as an edge node; any
	// value counts, including "". Default DefaultEdgeLabel.
	EdgeLabel string
	// Sources are further kinds of objects bound to one node each, such as
	// custom resources. Default none.
	Sources []Source
	// Logger receives the catalog's logs. Default: discarded.
	Logger *slog.Logger
}

// nodeIndex is the name of the informer index of bound objects (Pods and
// sources) by the node they are bound to.
const nodeIndex = "node"

// role says how objects of a kind come to belong to a node.
type role int

const (
	roleNode       role = iota // the edge Node object itself
	roleBound                  // bound to one node by a field: Pods, sources
	roleReferenced             // belongs to the nodes whose pods reference it
)

// kind is one kind of object the catalog hands out, with its informer.
type kind struct {
	gvk      schema.GroupVersionKind
	role     role
	informer cache.SharedIndexInformer
	// nodeOf returns the node an object of a roleBound kind is bound to.
	nodeOf func(runtime.Object) string
}

// kindID is how keys name kinds.
type kindID struct{ group, kind string }

// Catalog tracks which objects belong to which edge node. Build it with New,
// Subscribe, then Run it; its query methods are safe for concurrent use.
type Catalog struct {
	logger    *slog.Logger
	edgeLabel string
	factory   informers.SharedInformerFactory
	kinds     map[kindID]*kind // every kind, read-only after New
	bound     []*kind          // the roleBound kinds: Pods, then sources
	sources   []*kind          // informers Run runs itself, outside the factory
	synced    []cache.DoneChecker
	started   atomic.Bool

	// mu guards what the event handlers maintain. Keys, Get and Belongs
	// read it together with the informer caches, so that an edge node's
	// membership and its reference counts are seen at one instant.
	mu   sync.Mutex
	subs []func(node string, key objsync.Key)
	// edges holds the edge nodes, as the Node handler has seen them.
	edges map[string]struct{}
	// pods holds, per pod ("namespace/name"), its node and references as
	// last counted, so that each event is diffed against what was counted
	// rather than against an old object that may be stale.
	pods map[string]podEntry
	// refs counts, per node, the pods that reference each ConfigMap and
	// Secret; users is the same relation inverted, holding for each
	// referenced key the nodes whose count is positive.
	refs  map[string]map[objsync.Key]int
	users map[objsync.Key]map[string]struct{}
}

// podEntry is what the catalog counted for one pod.
type podEntry struct {
	key  objsync.Key
	node string
	refs []objsync.Key // from podRefs: sorted, distinct
}

// New builds a catalog that watches Kubernetes through client. It makes no
// request until Run.
func New(client kubernetes.Interface, cfg Config) (*Catalog, error) {
	if client == nil {
		return nil, fmt.Errorf("%w: nil client", ErrInvalidConfig)
	}
	if cfg.EdgeLabel == "" {
		cfg.EdgeLabel = DefaultEdgeLabel
	}
	if errs := validation.IsQualifiedName(cfg.EdgeLabel); len(errs) > 0 {
		return nil, fmt.Errorf("%w: edge label %q: %s", ErrInvalidConfig, cfg.EdgeLabel, strings.Join(errs, "; "))
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}

	c := &Catalog{
		logger:    cfg.Logger.With("component", "catalog"),
		edgeLabel: cfg.EdgeLabel,
		factory:   informers.NewSharedInformerFactory(client, 0),
		kinds:     make(map[kindID]*kind),
		edges:     make(map[string]struct{}),
		pods:      make(map[string]podEntry),
		refs:      make(map[string]map[objsync.Key]int),
		users:     make(map[objsync.Key]map[string]struct{}),
	}

	// A label key alone selects the objects that carry it, whatever its
	// value. A node that loses the label leaves the watch as a deletion.
	nodes := c.factory.InformerFor(&corev1.Node{}, func(cs kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
		return coreinformers.NewFilteredNodeInformer(cs, resync, cache.Indexers{},
			func(o *metav1.ListOptions) { o.LabelSelector = cfg.EdgeLabel })
	})
	podNode := func(obj runtime.Object) string {
		if p, ok := obj.(*corev1.Pod); ok {
			return p.Spec.NodeName
		}
		return ""
	}
	scheduled := fields.OneTermNotEqualSelector("spec.nodeName", "").String()
	pods := c.factory.InformerFor(&corev1.Pod{}, func(cs kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
		return coreinformers.NewFilteredPodInformer(cs, metav1.NamespaceAll, resync,
			cache.Indexers{nodeIndex: indexByNode(podNode)},
			func(o *metav1.ListOptions) { o.FieldSelector = scheduled })
	})
	core := func(k string) schema.GroupVersionKind { return corev1.SchemeGroupVersion.WithKind(k) }
	podKind := &kind{gvk: core(kindPod), role: roleBound, informer: pods, nodeOf: podNode}
	builtin := []*kind{
		{gvk: core(kindNode), role: roleNode, informer: nodes},
		podKind,
		{gvk: core(kindConfigMap), role: roleReferenced, informer: c.factory.Core().V1().ConfigMaps().Informer()},
		{gvk: core(kindSecret), role: roleReferenced, informer: c.factory.Core().V1().Secrets().Informer()},
	}
	for _, k := range builtin {
		c.kinds[kindID{k.gvk.Group, k.gvk.Kind}] = k
	}
	c.bound = append(c.bound, podKind)

	for i := range cfg.Sources {
		s := &cfg.Sources[i]
		if err := s.validate(); err != nil {
			return nil, err
		}
		id := kindID{s.GroupVersionKind.Group, s.GroupVersionKind.Kind}
		if _, dup := c.kinds[id]; dup {
			return nil, fmt.Errorf("%w: source %s: kind already handled", ErrInvalidConfig, s.GroupVersionKind)
		}
		k := &kind{
			gvk:  s.GroupVersionKind,
			role: roleBound,
			informer: cache.NewSharedIndexInformerWithOptions(s.ListerWatcher, s.Object, cache.SharedIndexInformerOptions{
				Indexers:          cache.Indexers{nodeIndex: indexByNode(s.NodeName)},
				ObjectDescription: s.GroupVersionKind.String(),
			}),
			nodeOf: s.NodeName,
		}
		c.kinds[id] = k
		c.bound = append(c.bound, k)
		c.sources = append(c.sources, k)
	}

	for _, k := range c.kinds {
		if err := c.wire(k); err != nil {
			return nil, fmt.Errorf("catalog: set up %s informer: %w", k.gvk.Kind, err)
		}
	}
	return c, nil
}

// wire sets k's informer's transform, watch error handler and event
// handler.
func (c *Catalog) wire(k *kind) error {
	if err := k.informer.SetTransform(stripTransform(k.gvk)); err != nil {
		return fmt.Errorf("set transform: %w", err)
	}
	if err := k.informer.SetWatchErrorHandlerWithContext(c.watchErrorHandler(k.gvk)); err != nil {
		return fmt.Errorf("set watch error handler: %w", err)
	}
	var h cache.ResourceEventHandler
	switch {
	case k.role == roleNode:
		h = cache.ResourceEventHandlerDetailedFuncs{
			AddFunc:    c.nodeAdded,
			UpdateFunc: c.nodeUpdated,
			DeleteFunc: c.nodeDeleted,
		}
	case k.gvk.Group == "" && k.gvk.Kind == kindPod:
		h = cache.ResourceEventHandlerFuncs{
			AddFunc:    c.podChanged,
			UpdateFunc: func(_, obj any) { c.podChanged(obj) },
			DeleteFunc: c.podDeleted,
		}
	case k.role == roleBound:
		h = cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { c.boundChanged(k, nil, obj) },
			UpdateFunc: func(old, obj any) { c.boundChanged(k, old, obj) },
			DeleteFunc: func(obj any) { c.boundChanged(k, obj, nil) },
		}
	default:
		h = cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { c.referencedChanged(k, obj) },
			UpdateFunc: func(_, obj any) { c.referencedChanged(k, obj) },
			DeleteFunc: func(obj any) { c.referencedChanged(k, obj) },
		}
	}
	reg, err := k.informer.AddEventHandler(h)
	if err != nil {
		return fmt.Errorf("add event handler: %w", err)
	}
	// The registration is synced once the informer has listed and this
	// handler has seen every listed object, so the counts are complete.
	c.synced = append(c.synced, reg.HasSyncedChecker())
	return nil
}

// indexByNode indexes bound objects by the node nodeOf names.
func indexByNode(nodeOf func(runtime.Object) string) cache.IndexFunc {
	return func(obj any) ([]string, error) {
		o, ok := obj.(runtime.Object)
		if !ok {
			return nil, nil
		}
		if node := nodeOf(o); node != "" {
			return []string{node}, nil
		}
		return nil, nil
	}
}

// Subscribe registers fn to be told whenever key may have changed for node:
// the object was added, updated or deleted, or it started or stopped
// belonging to node (a pod bound or removed, a reference gained or lost, the
// node gaining or losing its edge label, which notifies every key of the
// node). fn reads the new state back with Get or Belongs.
//
// Only edge nodes are notified. fn is called from informer goroutines,
// several at once, with no lock of the catalog held; it must be cheap, such
// as adding to a workqueue, since it delays the informer's next event. Call
// Subscribe before Run; no call comes after Run has returned.
func (c *Catalog) Subscribe(fn func(node string, key objsync.Key)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.subs = append(c.subs, fn)
}

// Run starts the informers and blocks until ctx ends. It returns nil then,
// once every informer goroutine, event handlers included, has exited. A
// Catalog runs once: a second call returns ErrAlreadyStarted.
func (c *Catalog) Run(ctx context.Context) error {
	if !c.started.CompareAndSwap(false, true) {
		return ErrAlreadyStarted
	}
	c.logger.Info("catalog starting", "edge_label", c.edgeLabel, "sources", len(c.sources))
	var wg sync.WaitGroup
	c.factory.StartWithContext(ctx)
	for _, k := range c.sources {
		wg.Go(func() { k.informer.RunWithContext(ctx) })
	}
	<-ctx.Done()
	c.factory.Shutdown()
	wg.Wait()
	c.logger.Info("catalog stopped")
	return nil
}

// WaitForSync blocks until every informer has listed its objects and the
// catalog has counted them all, or until ctx ends, which it reports as an
// error. It does not start anything: Run must be running too.
func (c *Catalog) WaitForSync(ctx context.Context) error {
	if !cache.WaitFor(ctx, "", c.synced...) {
		return fmt.Errorf("catalog: wait for informer caches: %w", context.Cause(ctx))
	}
	return nil
}

// EdgeNodes returns the names of the edge nodes, sorted.
func (c *Catalog) EdgeNodes() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	names := make([]string, 0, len(c.edges))
	for n := range c.edges {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Keys returns the keys of every object node must hold now, in no
// particular order: its Node, its Pods and source objects, and the
// ConfigMaps and Secrets its pods reference that exist. It is nil if node is
// not an edge node. It reads caches only.
func (c *Catalog) Keys(node string) []objsync.Key {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.edges[node]; !ok {
		return nil
	}
	return c.keysLocked(node, true)
}

// Get returns the object named by key if it belongs to node now, and false
// if it does not: it does not exist, it belongs to other nodes only, or node
// is not an edge node. It reads caches only.
func (c *Catalog) Get(node string, key objsync.Key) (Object, bool) {
	k, o, ok := c.lookup(node, key)
	if !ok {
		return Object{}, false
	}
	obj, err := encode(k.gvk, o)
	if err != nil {
		// Cannot happen for objects decoded from the API server.
		c.logger.Error("cannot encode object", "node", node, "key", key.String(), "error", err)
		return Object{}, false
	}
	return obj, true
}

// Version returns the uid and resourceVersion of the object named by key
// if it belongs to node now, without encoding it. It reads caches only.
func (c *Catalog) Version(node string, key objsync.Key) (uid, resourceVersion string, ok bool) {
	_, o, ok := c.lookup(node, key)
	if !ok {
		return "", "", false
	}
	return string(o.GetUID()), o.GetResourceVersion(), true
}

// Node returns the cached Node of edge node name (a copy is the caller's
// to make: the object is the cache's). Nodes without the edge label are
// not cached. It reads caches only.
func (c *Catalog) Node(name string) (*corev1.Node, bool) {
	k := c.kinds[kindID{"", kindNode}]
	if k == nil {
		return nil, false
	}
	o, ok := k.get(objsync.Key{Kind: kindNode, Name: name})
	if !ok {
		return nil, false
	}
	n, ok := o.(*corev1.Node)
	return n, ok
}

// Belongs reports whether the object named by key exists and belongs to
// node now. It reads caches only.
func (c *Catalog) Belongs(node string, key objsync.Key) bool {
	_, _, ok := c.lookup(node, key)
	return ok
}

// lookup returns the cached object named by key if it belongs to node.
func (c *Catalog) lookup(node string, key objsync.Key) (*kind, kubeObject, bool) {
	k := c.kinds[kindID{key.Group, key.Kind}]
	if k == nil {
		return nil, nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.edges[node]; !ok {
		return nil, nil, false
	}
	switch k.role {
	case roleNode:
		if key.Namespace != "" || key.Name != node {
			return nil, nil, false
		}
	case roleReferenced:
		if c.refs[node][key] == 0 {
			return nil, nil, false
		}
	}
	o, ok := k.get(key)
	if !ok || (k.role == roleBound && k.nodeOf(o) != node) {
		return nil, nil, false
	}
	return k, o, true
}

// keysLocked returns the keys of node's objects. With existing, it leaves
// out referenced objects that are not in the cache. c.mu must be held.
func (c *Catalog) keysLocked(node string, existing bool) []objsync.Key {
	refs := c.refs[node]
	bound := make([][]any, len(c.bound))
	n := 1 + len(refs)
	for i, k := range c.bound {
		// The error is for an unknown index; nodeIndex is registered in New.
		bound[i], _ = k.informer.GetIndexer().ByIndex(nodeIndex, node)
		n += len(bound[i])
	}
	keys := make([]objsync.Key, 0, n)
	keys = append(keys, objsync.Key{Kind: kindNode, Name: node})
	for i, k := range c.bound {
		for _, obj := range bound[i] {
			if o, ok := obj.(kubeObject); ok {
				keys = append(keys, k.key(o))
			}
		}
	}
	for key := range refs {
		if existing {
			if _, ok := c.kinds[kindID{key.Group, key.Kind}].get(key); !ok {
				continue
			}
		}
		keys = append(keys, key)
	}
	return keys
}

// key returns the key of an object of kind k.
func (k *kind) key(o metav1.Object) objsync.Key {
	return objsync.Key{Group: k.gvk.Group, Kind: k.gvk.Kind, Namespace: o.GetNamespace(), Name: o.GetName()}
}

// get returns the cached object named by key.
func (k *kind) get(key objsync.Key) (kubeObject, bool) {
	obj, ok, err := k.informer.GetIndexer().GetByKey(storeKey(key.Namespace, key.Name))
	if err != nil || !ok {
		return nil, false
	}
	o, ok := obj.(kubeObject)
	return o, ok
}

// storeKey is the informer cache key of an object: "namespace/name", or
// "name" for cluster-scoped objects.
func storeKey(namespace, name string) string {
	if namespace == "" {
		return name
	}
	return namespace + "/" + name
}
