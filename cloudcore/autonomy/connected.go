package autonomy

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// lookConnected is the half of every replica: the Node of each edge with a
// session here must say so, TetherConnected True and no offline taint. It
// reads the Nodes from the cache and writes only those that say otherwise,
// so that a reconnect of edges whose Nodes already say so (every edge after
// a CloudCore restart) costs no API request. A session here is the truth:
// the condition is written unconditionally; the taint removal is
// conditional on the version read, and a conflict is decided again at the
// next look. A Node not in the cache yet (its registration is on
// its way) is looked at again next time. A write is not made again until
// the cache has moved past the version it was decided on (or it failed).
//
// A Node that says False (the leader stands in, or stood in until the
// window ran out) is taken back only once the edge has renewed its Lease
// since CloudCore last did (renewedByEdge): a session this replica still
// holds but the edge no longer renews through (a dead peer not yet timed
// out) must not undo the leader's writes.
func (c *Controller) lookConnected(ctx context.Context) {
	now := c.cfg.Now()
	next := make(map[string]string, len(c.pending))
	for _, name := range c.sessions.Connected() {
		n, ok := c.nodes.Node(name)
		if !ok || connected(n) {
			continue
		}
		if rv, ok := c.pending[name]; ok && rv == n.ResourceVersion {
			next[name] = rv
			continue
		}
		cur := n
		cond := conditionOf(n, ConditionType)
		if cond != nil && cond.Status == corev1.ConditionFalse {
			back, err := c.renewedByEdge(ctx, name)
			if err != nil {
				c.fail(ctx, "read lease", name, err)
				continue
			}
			if !back {
				continue
			}
		}
		if cond == nil || cond.Status != corev1.ConditionTrue {
			// lastHeartbeatTime: when CloudCore last saw the session,
			// which the leader counts as a sign of life.
			written, err := c.writeCondition(ctx, name, "", true, ReasonConnected, "the edge has a session with CloudCore", now, now)
			if err != nil {
				c.fail(ctx, "write condition", name, err)
				continue
			}
			cur = written
			c.logger.Info("edge connected", "node", name)
		}
		if tainted(cur) {
			if err := c.setTaint(ctx, name, cur, false); err != nil {
				if !apierrors.IsConflict(err) {
					c.fail(ctx, "remove offline taint", name, err)
				}
				continue
			}
		}
		next[name] = n.ResourceVersion
	}
	c.pending = next
}

// renewedByEdge reads node's Lease and reports whether the edge, not
// CloudCore standing in, renewed it last (or it has none). One read per
// look while a reconnected edge's first renewal is on its way.
func (c *Controller) renewedByEdge(ctx context.Context, node string) (bool, error) {
	l, err := c.client.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("read lease %s: %w", node, err)
	}
	return !standInHolds(l), nil
}
