package nodestatus

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
)

// The Node as the cloud holds it decides what the reporter sends, the way
// kubelet compares its Node with the API server's: the cloud sends every
// edge its own Node (cloudcore/catalog), so the edge store holds the
// cloud's copy, and a report that would change nothing in it is not made.
//
//   - At start the registration is published only when the held Node is
//     missing, lacks one of the labels the edge registers (or has another
//     value for it), or differs in what the edge reports of its status:
//     capacity, allocatable, addresses, nodeInfo and the Ready condition's
//     status, reason and message. Else, when the held Ready heartbeat is
//     older than StatusEvery, a status report goes out; else nothing, and
//     the first status report is due StatusEvery after that heartbeat. A
//     restart that changes nothing therefore sends no Node up, and no
//     re-written Node comes back down.
//   - The Ready condition keeps the held lastTransitionTime while its
//     status is the held one, so that a restart does not date a transition
//     that did not happen.
//   - While running, whenever the held Node changes (the cloud sent a new
//     version: the node lifecycle controller set Ready Unknown while the
//     edge was away, someone edited the status) and its status differs
//     from the edge's, a status report goes out, but not within a lease
//     renewal interval of the last Node report: the Node the cloud had
//     before a registration or report arrives after it and is not
//     reported again, and a cloud that never takes the edge's status (a
//     field the API server rewrites) costs one report per interval, not a
//     loop.
//
// Labels are compared at start only: a label the operator overrides
// (cloudcore's EdgeNode labels win over the edge's) makes every start
// register, as every start did before.

// Held is the edge store's copy of the objects the cloud sends, where the
// reporter reads the node's own Node (edgecore/store.Store).
type Held interface {
	Get(ctx context.Context, key objsync.Key) (obj store.Object, ok bool, err error)
	Subscribe(fn func(keys []objsync.Key)) (cancel func())
}

// nodeKey is the key of the node's own Node in the store.
func (r *Reporter) nodeKey() objsync.Key { return objsync.Key{Kind: "Node", Name: r.cfg.Node} }

// held returns the node's Node as the store holds it; nil when there is
// none, no Held is configured, or it cannot be read (then the reporter
// behaves as if the cloud held nothing, and reports).
func (r *Reporter) held(ctx context.Context) *corev1.Node {
	if r.cfg.Held == nil {
		return nil
	}
	o, ok, err := r.cfg.Held.Get(ctx, r.nodeKey())
	if err != nil || !ok {
		if err != nil && ctx.Err() == nil {
			if ok, suppressed := r.lim.Allow("held"); ok {
				r.logger.Warn("cannot read the held node; reporting", "err", err, "suppressed", suppressed)
			}
		}
		return nil
	}
	var n corev1.Node
	if err := json.Unmarshal(o.Data, &n); err != nil {
		if ok, suppressed := r.lim.Allow("held"); ok {
			r.logger.Warn("held node unreadable; reporting", "err", fmt.Errorf("decode node: %w", err), "suppressed", suppressed)
		}
		return nil
	}
	return &n
}

// adoptTransition takes the held Ready condition's lastTransitionTime when
// its status is the one the reporter has now.
func (r *Reporter) adoptTransition(held *corev1.Node) {
	c, ok := readyCondition(held)
	if !ok || c.LastTransitionTime.IsZero() {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if c.Status == r.ready.status {
		r.since = c.LastTransitionTime.Time
	}
}

func readyCondition(n *corev1.Node) (corev1.NodeCondition, bool) {
	if n == nil {
		return corev1.NodeCondition{}, false
	}
	i := slices.IndexFunc(n.Status.Conditions, func(c corev1.NodeCondition) bool { return c.Type == corev1.NodeReady })
	if i < 0 {
		return corev1.NodeCondition{}, false
	}
	return n.Status.Conditions[i], true
}

// hasLabels reports whether held carries every label of want, with its
// value.
func hasLabels(held, want *corev1.Node) bool {
	for k, v := range want.Labels {
		if got, ok := held.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// sameStatus reports whether held says what want says of the node's
// status, times left out.
func sameStatus(held, want *corev1.Node) bool {
	hc, ok := readyCondition(held)
	wc, _ := readyCondition(want)
	return ok && hc.Status == wc.Status && hc.Reason == wc.Reason && hc.Message == wc.Message &&
		sameResources(held.Status.Capacity, want.Status.Capacity) &&
		sameResources(held.Status.Allocatable, want.Status.Allocatable) &&
		slices.Equal(held.Status.Addresses, want.Status.Addresses) &&
		held.Status.NodeInfo == want.Status.NodeInfo
}

// sameResources compares quantities by value: the API server may write
// one in another form ("4Gi" as "4294967296").
func sameResources(a, b corev1.ResourceList) bool {
	return len(a) == len(b) && maps.EqualFunc(a, b, func(x, y resource.Quantity) bool { return x.Cmp(y) == 0 })
}

// heartbeat returns the held Ready condition's lastHeartbeatTime (zero:
// none).
func heartbeat(held *corev1.Node) time.Time {
	c, _ := readyCondition(held)
	return c.LastHeartbeatTime.Time
}
