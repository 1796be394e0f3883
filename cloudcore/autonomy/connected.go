package autonomy

import (
	"context"

	corev1 "k8s.io/api/core/v1"
)

// lookConnected is the half of every replica: the Node of each edge with a
// session here must say so, TetherConnected True and no offline taint. It
// reads the Nodes from the cache and writes only those that say otherwise,
// so that a reconnect of edges whose Nodes already say so (every edge after
// a CloudCore restart) costs no API request. A session here is the truth:
// the condition is written unconditionally, and the taint removal is tried
// again on a conflict. A Node not in the cache yet (its registration is on
// its way) is looked at again next time. A write is not made again until
// the cache has moved past the version it was decided on (or it failed).
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
		if cond := conditionOf(n, ConditionType); cond == nil || cond.Status != corev1.ConditionTrue {
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
			if err := c.setTaint(ctx, name, cur, false, true); err != nil {
				c.fail(ctx, "remove offline taint", name, err)
				continue
			}
		}
		next[name] = n.ResourceVersion
	}
	c.pending = next
}
