package autonomy

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// defaultLeaseDuration is used when the Lease names none (kubelet's).
const defaultLeaseDuration = 40 * time.Second

func leaseDuration(l *coordinationv1.Lease) time.Duration {
	if l.Spec.LeaseDurationSeconds == nil || *l.Spec.LeaseDurationSeconds <= 0 {
		return defaultLeaseDuration
	}
	return time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
}

// standInHolds reports whether CloudCore, not the edge, renewed l last.
func standInHolds(l *coordinationv1.Lease) bool {
	return l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == HolderStandIn
}

func isOffline(t corev1.Taint) bool { return t.MatchTaint(&TaintOffline) }

func tainted(n *corev1.Node) bool { return slices.ContainsFunc(n.Spec.Taints, isOffline) }

func conditionOf(n *corev1.Node, typ corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// connected reports whether n says what a connected edge's Node says:
// TetherConnected True and no offline taint.
func connected(n *corev1.Node) bool {
	cond := conditionOf(n, ConditionType)
	return cond != nil && cond.Status == corev1.ConditionTrue && !tainted(n)
}

// writeCondition writes the TetherConnected condition with a strategic
// merge patch (merged by type, so the edge's conditions stay), conditional
// on resourceVersion when it is not empty, and returns the Node written.
func (c *Controller) writeCondition(ctx context.Context, name, resourceVersion string, online bool, reason, msg string, heartbeat, now time.Time) (*corev1.Node, error) {
	status := corev1.ConditionFalse
	if online {
		status = corev1.ConditionTrue
	}
	patch := map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{{
		Type: ConditionType, Status: status, Reason: reason, Message: msg,
		LastHeartbeatTime: metav1.NewTime(heartbeat), LastTransitionTime: metav1.NewTime(now),
	}}}}
	if resourceVersion != "" {
		patch["metadata"] = map[string]any{"resourceVersion": resourceVersion}
	}
	b, err := json.Marshal(patch)
	if err != nil {
		return nil, fmt.Errorf("encode condition: %w", err)
	}
	n, err := c.client.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, b, metav1.PatchOptions{FieldManager: c.cfg.FieldManager}, "status")
	if err != nil {
		return nil, fmt.Errorf("write condition %s=%s: %w", ConditionType, status, err)
	}
	return n, nil
}

// setTaint adds (want) or removes TaintOffline on the Node, starting from
// cur (the cache's, not modified), keeping every other taint; the write is
// conditional on cur's resourceVersion. A conflict (someone wrote the Node
// since: the node lifecycle controller, the operator, the edge's
// re-registration, another replica) is returned, errors.Is apierrors'
// conflict, and the next look decides again from the cache.
func (c *Controller) setTaint(ctx context.Context, name string, cur *corev1.Node, want bool) error {
	if tainted(cur) == want {
		return nil
	}
	taints := slices.DeleteFunc(slices.Clone(cur.Spec.Taints), isOffline)
	if want {
		taints = append(taints, TaintOffline)
	}
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": cur.ResourceVersion},
		"spec":     map[string]any{"taints": taints},
	})
	if err != nil {
		return fmt.Errorf("encode taints: %w", err)
	}
	if _, err := c.client.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: c.cfg.FieldManager}); err != nil {
		return fmt.Errorf("write taints (tainted %v): %w", want, err)
	}
	c.logger.Info("node offline taint changed", "node", name, "tainted", want)
	return nil
}

// renew writes the Lease's renewTime from l (the cache's, not modified),
// holderIdentity HolderStandIn, conditional on its resourceVersion: a
// Lease someone else wrote since l (the edge renewing through a replica)
// conflicts, and that write stands. It reports whether it renewed.
func (c *Controller) renew(ctx context.Context, l *coordinationv1.Lease, now time.Time) (bool, error) {
	next := l.DeepCopy()
	renew, holder := metav1.NewMicroTime(now), HolderStandIn
	next.Spec.RenewTime, next.Spec.HolderIdentity = &renew, &holder
	_, err := c.client.CoordinationV1().Leases(l.Namespace).Update(ctx, next, metav1.UpdateOptions{FieldManager: c.cfg.FieldManager})
	if apierrors.IsConflict(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("renew lease %s: %w", l.Name, err)
	}
	c.renewals.Inc()
	return true, nil
}
