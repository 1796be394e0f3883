package upstream

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tetheredge/tether/common/message"
)

// leaseCache remembers, per node, the renewTime of the last lease this
// writer wrote, so that a renewal that is not newer (a resend after a lost
// ack, an old one from another replica's session) costs no API request:
// the API server already holds that renewal or a later one. Skipping it
// loses nothing even when the edge's clock stepped back: the node
// lifecycle controller counts a heartbeat only when the renewTime it sees
// is after the one it saved (monitorNodeHealth, RenewTime.Before), so a
// renewal that is not newer would not count either, written or not. The
// cache holds one entry per node that renewed through this writer, a few
// dozen bytes each.
type leaseCache struct {
	mu   sync.Mutex
	last map[string]int64 // node -> renewTime in Unix microseconds
}

// newer reports whether renew (Unix microseconds) is later than the last
// one written for node.
func (c *leaseCache) newer(node string, renew int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	last, ok := c.last[node]
	return !ok || renew > last
}

// written records renew as written for node, unless a later one was.
func (c *leaseCache) written(node string, renew int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if last, ok := c.last[node]; !ok || renew > last {
		c.last[node] = renew
	}
}

// lease writes the node's heartbeat: one merge patch of the spec, with no
// read first (a create when the Lease does not exist yet), and nothing at
// all when the renewal is not newer than the last one written. A renewal
// is never sent with a resourceVersion: the edge is the Lease's only
// writer and its newest renewal is the one that counts.
func (w *Writer) lease(ctx context.Context, node string, m *message.Message) error {
	var l coordinationv1.Lease
	if err := json.Unmarshal(m.Payload, &l); err != nil {
		return forbidden(reasonBadPayload, "node %q: lease payload is not a Lease: %v", node, err)
	}
	var renew int64
	if l.Spec.RenewTime != nil {
		renew = l.Spec.RenewTime.UnixMicro()
		if !w.leases.newer(node, renew) {
			return nil
		}
	}
	patch, err := json.Marshal(map[string]any{"spec": l.Spec})
	if err != nil {
		return fmt.Errorf("encode lease %s: %w", node, err)
	}
	leases := w.client.CoordinationV1().Leases(LeaseNamespace)
	_, err = leases.Patch(ctx, node, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: w.cfg.FieldManager})
	if apierrors.IsNotFound(err) {
		l.ObjectMeta = metav1.ObjectMeta{Name: node, Namespace: LeaseNamespace}
		_, err = leases.Create(ctx, &l, metav1.CreateOptions{FieldManager: w.cfg.FieldManager})
	}
	if err != nil {
		return apiError("write lease "+node, err, false)
	}
	if l.Spec.RenewTime != nil {
		w.leases.written(node, renew)
	}
	return nil
}
