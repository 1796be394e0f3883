// Package whitelist decides, from an informer cache of EdgeNode objects,
// whether a connecting edge may have a session: its EdgeNode exists, is
// allowed, and names the presented certificate's serial as current. It
// tells its subscribers when a node is disabled or removed so that live
// sessions end. It makes no API request per connection.
package whitelist

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/tunnel"
)

// ErrNotAllowed is wrapped by every refusal.
var ErrNotAllowed = errors.New("whitelist: not allowed")

// Whitelist is the EdgeNode cache.
type Whitelist struct {
	informer  cache.SharedIndexInformer
	factory   dynamicinformer.DynamicSharedInformerFactory
	client    *edgenode.Client
	logger    *slog.Logger
	now       func() time.Time
	connected chan string

	mu      sync.Mutex
	revoked []func(node, reason string)
}

// New builds the whitelist over a dynamic client. now may be nil.
func New(client dynamic.Interface, logger *slog.Logger, now func() time.Time) *Whitelist {
	if now == nil {
		now = time.Now
	}
	f := dynamicinformer.NewDynamicSharedInformerFactory(client, 0)
	w := &Whitelist{
		informer: f.ForResource(edgenode.GVR).Informer(), factory: f, client: edgenode.NewClient(client),
		logger: logger.With("component", "whitelist"), now: now, connected: make(chan string, 256),
	}
	_, _ = w.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		UpdateFunc: func(_, obj any) {
			if e := decode(obj); e != nil && !e.Spec.Allowed {
				w.revoke(e.Name, "node disabled on the whitelist")
			}
		},
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if u, ok := obj.(*unstructured.Unstructured); ok {
				w.revoke(u.GetName(), "node removed from the whitelist")
			}
		},
	})
	return w
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

// OnRevoke registers fn, called when a node loses its right to a session.
// Register before Run.
func (w *Whitelist) OnRevoke(fn func(node, reason string)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.revoked = append(w.revoked, fn)
}

func (w *Whitelist) revoke(node, reason string) {
	w.logger.Info("node revoked", "node", node, "reason", reason)
	w.mu.Lock()
	fns := append([]func(string, string){}, w.revoked...)
	w.mu.Unlock()
	for _, fn := range fns {
		fn(node, reason)
	}
}

// Run runs the informer, and records connections, until ctx ends.
func (w *Whitelist) Run(ctx context.Context) error {
	w.factory.Start(ctx.Done())
	defer w.factory.Shutdown()
	for {
		select {
		case <-ctx.Done():
			return nil
		case node := <-w.connected:
			w.recordConnected(ctx, node)
		}
	}
}

// Connected notes that node opened a session; Run records it in the
// EdgeNode's status (at most once a minute per node). Never blocks: when
// many nodes connect at once, some records are skipped.
func (w *Whitelist) Connected(node string) {
	select {
	case w.connected <- node:
	default:
	}
}

func (w *Whitelist) recordConnected(ctx context.Context, node string) {
	e, ok := w.Get(node)
	now := w.now()
	if !ok || (e.Status.LastConnected != nil && now.Sub(e.Status.LastConnected.Time) < time.Minute) {
		return
	}
	t := metav1.NewTime(now)
	e.Status.LastConnected = &t
	if _, err := w.client.UpdateStatus(ctx, e); err != nil {
		w.logger.Debug("cannot record connection", "node", node, "err", err)
	}
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

// Authorize is the tunnel's handshake hook: the certificate must be the
// current one of an allowed EdgeNode.
func (w *Whitelist) Authorize(id tunnel.Identity) error {
	e, ok := w.Get(id.Node)
	if !ok {
		return fmt.Errorf("%w: node %q is not on the whitelist", ErrNotAllowed, id.Node)
	}
	if err := e.CertificateCurrent(id.Serial, w.now()); err != nil {
		return fmt.Errorf("%w: %w", ErrNotAllowed, err)
	}
	return nil
}

// Labels returns the labels the operator set for node's Node.
func (w *Whitelist) Labels(node string) map[string]string {
	if e, ok := w.Get(node); ok {
		return e.Spec.Labels
	}
	return nil
}
