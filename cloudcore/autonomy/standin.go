package autonomy

import (
	"context"
	"errors"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	coordlisters "k8s.io/client-go/listers/coordination/v1"
	"k8s.io/client-go/tools/cache"
)

// seen is what the leader knows of one edge node at a look.
type seen struct {
	now     time.Time
	window  time.Duration
	here    bool                  // it has a session on this replica
	trusted bool                  // its EdgeNode exists and is allowed
	cond    *corev1.NodeCondition // TetherConnected (nil: none)
	lease   *coordinationv1.Lease // its Lease in kube-node-lease (nil: none)
}

// decision is what the leader does for one node at a look.
type decision struct {
	standIn bool      // no session anywhere: CloudCore stands in (counted, tainted once per outage)
	mark    bool      // write TetherConnected False/EdgeDisconnected first
	expire  bool      // write OfflineAutonomyExpired: the window is over
	renew   bool      // renew the Lease now
	since   time.Time // when the edge was last seen
}

// decide is the leader's rule, a pure function of what it sees:
//
//   - A node with a session here, an untrusted node, one without Lease
//     or without the condition (CloudCore never saw it connected) is left
//     alone.
//   - False/EdgeDisconnected: the edge has no session anywhere, since the
//     condition's lastHeartbeatTime. Within the window CloudCore stands in
//     and renews the Lease once a quarter of its duration has passed since
//     its renewTime; past the window it writes OfflineAutonomyExpired
//     once. A Lease the edge renewed (its holder is not HolderStandIn)
//     within half its duration says the edge is back, through a replica
//     that writes True: left alone.
//   - True: some replica said the edge is connected. If neither the Lease
//     nor that condition moved for half the Lease's duration (the edge
//     renews every quarter), no replica holds its session: the replica
//     that held it died with it, or lost it and has not been replaced.
//     CloudCore writes False, stands in and renews at once, the edge last
//     seen at the renewTime. Not past the window, counted from there.
//   - Anything else (False/OfflineAutonomyExpired) is left alone.
func decide(s seen) decision {
	if s.here || !s.trusted || s.cond == nil || s.lease == nil {
		return decision{}
	}
	var renewed time.Time
	if s.lease.Spec.RenewTime != nil {
		renewed = s.lease.Spec.RenewTime.Time
	}
	dur := leaseDuration(s.lease)
	switch {
	case s.cond.Status == corev1.ConditionFalse && s.cond.Reason == ReasonDisconnected:
		since := s.cond.LastHeartbeatTime.Time
		if s.now.Sub(since) > s.window {
			return decision{expire: true, since: since}
		}
		if !standInHolds(s.lease) && s.now.Sub(renewed) <= dur/2 {
			return decision{} // the edge renewed since: back through a replica, which says so
		}
		return decision{standIn: true, renew: s.now.Sub(renewed) >= dur/4, since: since}
	case s.cond.Status == corev1.ConditionTrue:
		if renewed.IsZero() || s.now.Sub(renewed) > s.window {
			return decision{}
		}
		last := renewed
		if hb := s.cond.LastHeartbeatTime.Time; hb.After(last) {
			last = hb
		}
		if s.now.Sub(last) <= dur/2 {
			return decision{}
		}
		return decision{standIn: true, mark: true, renew: true, since: renewed}
	}
	return decision{}
}

// term is the state of one leader term: the Lease cache and the outages
// whose offline taint it has seen to, by node, the outage named by when
// the edge was last seen (an operator who removes the taint during an
// outage is not overruled within a term).
type term struct {
	c       *Controller
	leases  coordlisters.LeaseNamespaceLister
	tainted map[string]time.Time
}

// lead is a leader term: it watches the Leases of kube-node-lease and
// stands in every Period until ctx ends.
func (c *Controller) lead(ctx context.Context) error {
	c.leading.Set(1)
	defer c.leading.Set(0)
	defer c.offline.Set(0)
	t, stop, err := c.startTerm(ctx)
	if err != nil {
		return err
	}
	defer stop()
	if ctx.Err() != nil {
		return nil // the term ended while the Leases were listed
	}
	tick := time.NewTicker(c.cfg.Period)
	defer tick.Stop()
	for {
		t.look(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// startTerm starts the Lease informer and waits until it has synced; stop
// ends it and waits for its goroutines. A term cut short while syncing
// (ctx ended) returns a term whose cache may be incomplete: not to look
// with.
func (c *Controller) startTerm(ctx context.Context) (*term, func(), error) {
	ctx, cancel := context.WithCancel(ctx)
	f := informers.NewSharedInformerFactoryWithOptions(c.client, 0,
		informers.WithNamespace(corev1.NamespaceNodeLease),
		informers.WithTransform(func(obj any) (any, error) {
			if o, ok := obj.(metav1.Object); ok {
				o.SetManagedFields(nil)
			}
			return obj, nil
		}))
	inf := f.Coordination().V1().Leases()
	informer, lister := inf.Informer(), inf.Lister()
	f.Start(ctx.Done())
	stop := func() { cancel(); f.Shutdown() }
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) && ctx.Err() == nil {
		stop()
		return nil, nil, errors.New("autonomy: the Lease informer did not sync")
	}
	return &term{c: c, leases: lister.Leases(corev1.NamespaceNodeLease), tainted: make(map[string]time.Time)}, stop, nil
}

// look decides for every edge node of the cache and acts.
func (t *term) look(ctx context.Context) {
	c := t.c
	now := c.cfg.Now()
	here := make(map[string]bool)
	for _, name := range c.sessions.Connected() {
		here[name] = true
	}
	offline := 0
	outages := make(map[string]time.Time, len(t.tainted))
	for _, name := range c.nodes.EdgeNodes() {
		n, ok := c.nodes.Node(name)
		if !ok {
			continue
		}
		l, err := t.leases.Get(name)
		if err != nil {
			l = nil // none (yet): nothing to renew
		}
		d := decide(seen{now: now, window: c.cfg.Window, here: here[name], trusted: c.cfg.Trusted(name), cond: conditionOf(n, ConditionType), lease: l})
		switch {
		case d.expire:
			msg := fmt.Sprintf("the edge has been offline since %s, longer than the offline autonomy window %s; CloudCore no longer renews its lease",
				d.since.UTC().Format(time.RFC3339), c.cfg.Window)
			_, err := c.writeCondition(ctx, name, n.ResourceVersion, false, ReasonExpired, msg, d.since, now)
			if err != nil {
				if !apierrors.IsConflict(err) {
					c.fail(ctx, "write condition", name, err)
				}
				continue
			}
			c.logger.Info("offline autonomy ended", "node", name, "reason", "window expired", "offline_since", d.since)
			continue
		case !d.standIn:
			continue
		}
		offline++
		if d.mark {
			// The Lease first: a replica that still holds a session it
			// has not yet found dead sees the condition only after the
			// Lease says CloudCore renewed it, and does not take the
			// condition back (connected.go).
			renewed, err := c.renew(ctx, l, now)
			if err != nil {
				c.fail(ctx, "renew lease", name, err)
				continue
			}
			if !renewed {
				continue // the edge renewed after all: decided again next look
			}
			d.renew = false
			written, err := c.writeCondition(ctx, name, n.ResourceVersion, false, ReasonDisconnected, offlineMessage(d.since, c.cfg.Window), d.since, now)
			if apierrors.IsConflict(err) {
				continue // the Node changed since the cache's view: decided again next look
			}
			if err != nil {
				c.fail(ctx, "write condition", name, err)
				continue
			}
			c.logger.Info("offline autonomy started", "node", name, "reason", "no session on any replica", "offline_since", d.since)
			n = written
		}
		outages[name] = t.tainted[name]
		if !t.tainted[name].Equal(d.since) {
			err := c.setTaint(ctx, name, n, true)
			switch {
			case err == nil:
				outages[name] = d.since
			case !apierrors.IsConflict(err):
				c.fail(ctx, "add offline taint", name, err)
			}
		}
		if d.renew {
			if _, err := c.renew(ctx, l, now); err != nil {
				c.fail(ctx, "renew lease", name, err)
			}
		}
	}
	t.tainted = outages
	c.offline.Set(float64(offline))
}

func offlineMessage(since time.Time, window time.Duration) string {
	return fmt.Sprintf("the edge has been offline since %s; CloudCore renews its lease until %s",
		since.UTC().Format(time.RFC3339), since.Add(window).UTC().Format(time.RFC3339))
}
