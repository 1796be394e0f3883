// Package whitelist decides, from an informer cache of EdgeNode objects,
// whether a connecting edge may have a session, and until when: its
// EdgeNode exists, is allowed, and names the presented certificate's
// serial as current (or as the previous one, within its grace after a
// renewal). It tells its subscribers of every change of an EdgeNode, so
// that each replica re-checks its live sessions against the new state. It
// makes no API request to authorise a connection; it writes the EdgeNode's
// status only to end a grace (once per renewal). Where and since when a
// node is connected, and when it last connected, are the connection
// writer's (edgenode.ConnectionWriter): one write per connect.
package whitelist

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/tunnel"
)

// ErrNotAllowed is wrapped by every refusal.
var ErrNotAllowed = errors.New("whitelist: not allowed")

// ErrNotReady is returned while the cache has not synced: the node may
// well be allowed, and asking again once it has synced will tell. It does
// not wrap ErrNotAllowed, so nothing takes it for a revocation.
var ErrNotReady = errors.New("whitelist: not synced yet")

// Whitelist is the EdgeNode cache.
type Whitelist struct {
	informer  cache.SharedIndexInformer
	factory   dynamicinformer.DynamicSharedInformerFactory
	client    *edgenode.Client
	logger    *slog.Logger
	now       func() time.Time
	connected chan tunnel.Identity

	mu      sync.Mutex
	changed []func(node string)
}

// New builds the whitelist over a dynamic client. now may be nil
// (time.Now), logger too (logs are discarded).
func New(client dynamic.Interface, logger *slog.Logger, now func() time.Time) *Whitelist {
	if now == nil {
		now = time.Now
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	f := dynamicinformer.NewDynamicSharedInformerFactory(client, 0)
	w := &Whitelist{
		informer: f.ForResource(edgenode.GVR).Informer(), factory: f, client: edgenode.NewClient(client),
		logger: logger.With("component", "whitelist"), now: now, connected: make(chan tunnel.Identity, 256),
	}
	// Every change is passed on, not only a disable: a join that supersedes
	// the serial, a removed grace and a deletion all end sessions, and the
	// subscriber decides by asking Until again.
	_, _ = w.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { w.notify(nameOf(obj)) },
		UpdateFunc: func(_, obj any) { w.notify(nameOf(obj)) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			w.notify(nameOf(obj))
		},
	})
	return w
}

func nameOf(obj any) string {
	if u, ok := obj.(*unstructured.Unstructured); ok {
		return u.GetName()
	}
	return ""
}

func decode(obj any) *edgenode.EdgeNode {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return nil
	}
	e, err := edgenode.FromUnstructured(u)
	if err != nil {
		return nil
	}
	return e
}

// OnChange registers fn, called (from the informer's goroutine, so it must
// not block) with the name of every EdgeNode added, changed or removed.
// Register before Run.
func (w *Whitelist) OnChange(fn func(node string)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.changed = append(w.changed, fn)
}

func (w *Whitelist) notify(node string) {
	if node == "" {
		return
	}
	w.mu.Lock()
	fns := append([]func(string){}, w.changed...)
	w.mu.Unlock()
	for _, fn := range fns {
		fn(node)
	}
}

// Run runs the informer, and ends graces, until ctx ends.
func (w *Whitelist) Run(ctx context.Context) error {
	w.factory.Start(ctx.Done())
	defer w.factory.Shutdown()
	for {
		select {
		case <-ctx.Done():
			return nil
		case id := <-w.connected:
			// The cache answers for every connection but the first with a
			// renewed certificate: no request.
			if e, ok := w.Get(id.Node); ok && endsGrace(e, id) {
				w.endGrace(ctx, e, id)
			}
		}
	}
}

// Connected notes that the peer id opened a session; when id presents the
// current certificate of a node whose previous one is in its grace, Run
// ends that grace. Never blocks: when many nodes connect at once, some are
// skipped (a skipped grace ends at its deadline or at the node's next
// connection).
func (w *Whitelist) Connected(id tunnel.Identity) {
	select {
	case w.connected <- id:
	default:
	}
}

// endsGrace says whether a session of id ends the grace of e's previous
// certificate: id presents the current one.
func endsGrace(e *edgenode.EdgeNode, id tunnel.Identity) bool {
	return e.Status.Previous != nil && e.Status.Certificate != nil && e.Status.Certificate.Serial == id.Serial
}

// endGrace drops e's previous certificate, since the node connected with
// the current one. It is not skipped on a conflict (the connection
// writer's write of the same connect, or a renewal): it is read again and
// retried (it happens once per renewal).
func (w *Whitelist) endGrace(ctx context.Context, e *edgenode.EdgeNode, id tunnel.Identity) {
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if e == nil {
			fresh, err := w.client.Get(ctx, id.Node)
			if err != nil {
				return err
			}
			e = fresh
		}
		if !endsGrace(e, id) {
			return nil
		}
		e.Status.Previous = nil
		_, err := w.client.UpdateStatus(ctx, e)
		e = nil
		return err
	})
	if err != nil {
		w.logger.Warn("cannot end the grace of the previous certificate", "node", id.Node, "err", err)
		return
	}
	w.logger.Info("previous certificate no longer accepted", "node", id.Node, "serial", id.Serial)
}

// WaitForSync waits for the cache.
func (w *Whitelist) WaitForSync(ctx context.Context) error {
	if !cache.WaitForCacheSync(ctx.Done(), w.informer.HasSynced) {
		return fmt.Errorf("whitelist: cache did not sync: %w", ctx.Err())
	}
	return nil
}

// Get returns the cached EdgeNode.
func (w *Whitelist) Get(node string) (*edgenode.EdgeNode, bool) {
	obj, ok, err := w.informer.GetStore().GetByKey(node)
	if err != nil || !ok {
		return nil, false
	}
	e := decode(obj)
	return e, e != nil
}

// Until reports until when the peer id may keep a session (the end of
// its certificate's acceptance, never past the certificate's own expiry),
// or why it may not have one now.
func (w *Whitelist) Until(id tunnel.Identity) (time.Time, error) {
	if !w.informer.HasSynced() {
		// An empty cache would call every node unknown.
		return time.Time{}, fmt.Errorf("%w: cannot check node %q", ErrNotReady, id.Node)
	}
	e, ok := w.Get(id.Node)
	if !ok {
		return time.Time{}, fmt.Errorf("%w: node %q is not on the whitelist", ErrNotAllowed, id.Node)
	}
	until, err := e.Accepts(id.Serial, w.now())
	if err != nil {
		return time.Time{}, fmt.Errorf("%w: %w", ErrNotAllowed, err)
	}
	if !id.NotAfter.IsZero() && id.NotAfter.Before(until) {
		until = id.NotAfter
	}
	return until, nil
}

// Authorize is the tunnel's handshake hook: the certificate must be one
// the whitelist accepts for an allowed EdgeNode now.
func (w *Whitelist) Authorize(id tunnel.Identity) error {
	_, err := w.Until(id)
	return err
}

// Labels returns the labels the operator set for node's Node.
func (w *Whitelist) Labels(node string) map[string]string {
	if e, ok := w.Get(node); ok {
		return e.Spec.Labels
	}
	return nil
}
