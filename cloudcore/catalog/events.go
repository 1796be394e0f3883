package catalog

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/cache"

	"github.com/tetheredge/tether/common/objsync"
)

// The informer event handlers below keep the catalog's counts and tell
// subscribers what may have changed. They never call the API server and
// never block beyond c.mu and the subscribers' own (cheap) functions.

// note is one notification: key may have changed for node.
type note struct {
	node string
	key  objsync.Key
}

// deliverLocked drops the notes of nodes that are not edge nodes and
// returns the subscribers to give the others to, after c.mu is released.
// c.mu must be held.
func (c *Catalog) deliverLocked(notes []note) ([]note, []func(string, objsync.Key)) {
	notes = slices.DeleteFunc(notes, func(n note) bool {
		_, edge := c.edges[n.node]
		return !edge
	})
	return notes, c.subs
}

// deliver calls every subscriber with every note. c.mu must not be held.
func deliver(notes []note, subs []func(string, objsync.Key)) {
	for _, n := range notes {
		for _, fn := range subs {
			fn(n.node, n.key)
		}
	}
}

// metaOf returns the object an event is about, looking through a deletion
// tombstone, or nil if it is not a Kubernetes object.
func metaOf(obj any) kubeObject {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	o, _ := obj.(kubeObject)
	return o
}

// nodeAdded handles a node that became an edge node (created with the
// label, or labelled), or one listed at start: every key it now has is
// notified.
func (c *Catalog) nodeAdded(obj any, initial bool) {
	o := metaOf(obj)
	if o == nil {
		return
	}
	node := o.GetName()
	c.mu.Lock()
	c.edges[node] = struct{}{}
	notes := c.nodeNotesLocked(node)
	notes, subs := c.deliverLocked(notes)
	c.mu.Unlock()
	level := slog.LevelInfo
	if initial {
		level = slog.LevelDebug // one line per edge node at every start is noise
	}
	c.logger.Log(context.Background(), level, "edge node added", "node", node, "keys", len(notes))
	deliver(notes, subs)
}

// nodeUpdated handles a change to an edge node other than losing its label.
func (c *Catalog) nodeUpdated(_, obj any) {
	o := metaOf(obj)
	if o == nil {
		return
	}
	c.mu.Lock()
	notes, subs := c.deliverLocked([]note{{o.GetName(), objsync.Key{Kind: kindNode, Name: o.GetName()}}})
	c.mu.Unlock()
	deliver(notes, subs)
}

// nodeDeleted handles a node that stopped being an edge node (deleted or
// unlabelled): every key it had is notified, and none belongs to it any
// more. Its reference counts stay, since its pods still exist and would count
// again if it became an edge node again.
func (c *Catalog) nodeDeleted(obj any) {
	o := metaOf(obj)
	if o == nil {
		return
	}
	node := o.GetName()
	c.mu.Lock()
	notes, subs := c.deliverLocked(c.nodeNotesLocked(node))
	delete(c.edges, node)
	c.mu.Unlock()
	c.logger.Info("edge node removed", "node", node, "keys", len(notes))
	deliver(notes, subs)
}

// nodeNotesLocked returns a note for every key node has, whether or not
// the referenced objects exist. c.mu must be held.
func (c *Catalog) nodeNotesLocked(node string) []note {
	keys := c.keysLocked(node, false)
	notes := make([]note, len(keys))
	for i, k := range keys {
		notes[i] = note{node, k}
	}
	return notes
}

// podChanged handles an added or updated pod: its node is notified of the
// pod, and of every ConfigMap and Secret that started or stopped being
// referenced by any of the node's pods.
func (c *Catalog) podChanged(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	key := objsync.Key{Kind: kindPod, Namespace: pod.Namespace, Name: pod.Name}
	c.setPod(storeKey(pod.Namespace, pod.Name), &podEntry{key: key, node: pod.Spec.NodeName, refs: podRefs(pod)})
}

// podDeleted handles a deleted pod, which references nothing any more.
func (c *Catalog) podDeleted(obj any) {
	id, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return // not an object: cannot happen with a typed informer
	}
	c.setPod(id, nil)
}

// setPod replaces what was counted for pod id with next (nil: nothing) and
// notifies what changed.
func (c *Catalog) setPod(id string, next *podEntry) {
	c.mu.Lock()
	prev, had := c.pods[id]
	var notes []note
	if had {
		notes = append(notes, note{prev.node, prev.key})
		for _, k := range prev.refs {
			kept := next != nil && next.node == prev.node && slices.Contains(next.refs, k)
			if !kept && c.releaseLocked(prev.node, k) {
				notes = append(notes, note{prev.node, k})
			}
		}
	}
	if next != nil {
		if !had || next.node != prev.node {
			notes = append(notes, note{next.node, next.key})
		}
		for _, k := range next.refs {
			kept := had && next.node == prev.node && slices.Contains(prev.refs, k)
			if !kept && c.acquireLocked(next.node, k) {
				notes = append(notes, note{next.node, k})
			}
		}
		c.pods[id] = *next
	} else {
		delete(c.pods, id)
	}
	notes, subs := c.deliverLocked(notes)
	c.mu.Unlock()
	deliver(notes, subs)
}

// acquireLocked counts one more pod of node referencing key and reports
// whether key now belongs to node and did not before. c.mu must be held.
func (c *Catalog) acquireLocked(node string, key objsync.Key) bool {
	if node == "" {
		return false
	}
	counts := c.refs[node]
	if counts == nil {
		counts = make(map[objsync.Key]int)
		c.refs[node] = counts
	}
	counts[key]++
	if counts[key] > 1 {
		return false
	}
	nodes := c.users[key]
	if nodes == nil {
		nodes = make(map[string]struct{})
		c.users[key] = nodes
	}
	nodes[node] = struct{}{}
	return true
}

// releaseLocked counts one pod of node fewer referencing key and reports
// whether key no longer belongs to node. c.mu must be held.
func (c *Catalog) releaseLocked(node string, key objsync.Key) bool {
	counts := c.refs[node]
	if counts[key] == 0 {
		return false // never acquired: the pod had no node
	}
	counts[key]--
	if counts[key] > 0 {
		return false
	}
	delete(counts, key)
	if len(counts) == 0 {
		delete(c.refs, node)
	}
	delete(c.users[key], node)
	if len(c.users[key]) == 0 {
		delete(c.users, key)
	}
	return true
}

// boundChanged handles an object of a source kind. old is nil for an
// addition and obj nil for a deletion. Both the node it was bound to and the
// node it is bound to now are notified.
func (c *Catalog) boundChanged(k *kind, old, obj any) {
	var notes []note
	for _, e := range []any{old, obj} {
		o := metaOf(e)
		if o == nil {
			continue
		}
		n := note{k.nodeOf(o), k.key(o)}
		if n.node != "" && !slices.Contains(notes, n) {
			notes = append(notes, n)
		}
	}
	c.mu.Lock()
	notes, subs := c.deliverLocked(notes)
	c.mu.Unlock()
	deliver(notes, subs)
}

// referencedChanged handles an added, updated or deleted ConfigMap or
// Secret: every edge node whose pods reference it is notified.
func (c *Catalog) referencedChanged(k *kind, obj any) {
	o := metaOf(obj)
	if o == nil {
		return
	}
	key := k.key(o)
	c.mu.Lock()
	notes := make([]note, 0, len(c.users[key]))
	for node := range c.users[key] {
		notes = append(notes, note{node, key})
	}
	notes, subs := c.deliverLocked(notes)
	c.mu.Unlock()
	deliver(notes, subs)
}

// watchErrorHandler logs why an informer's watch of gvk ended. The informer
// relists or rewatches by itself; this only replaces client-go's klog output
// with the catalog's logger.
func (c *Catalog) watchErrorHandler(gvk schema.GroupVersionKind) cache.WatchErrorHandlerWithContext {
	return func(ctx context.Context, _ *cache.Reflector, err error) {
		switch {
		case ctx.Err() != nil, errors.Is(err, io.EOF):
			// Shutting down, or the server closed the watch normally.
		case apierrors.IsResourceExpired(err) || apierrors.IsGone(err):
			c.logger.Debug("watch expired, relisting", "kind", gvk.Kind, "error", err)
		default:
			c.logger.Warn("watch failed", "kind", gvk.Kind, "error", err)
		}
	}
}
