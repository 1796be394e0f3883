// Package autonomy keeps an offline edge site's pods where they are: while
// a trusted edge node has no session, CloudCore renews the node's Lease in
// kube-node-lease in the edge's place, for at most a configured window, so
// the node lifecycle controller never marks the node Unknown, never taints
// it unreachable and the taint eviction controller evicts nothing. It says
// so on the Node: condition TetherConnected is False, reason
// EdgeDisconnected, while CloudCore stands in, and True, reason
// EdgeConnected, while the edge has a session here; and it taints the Node
// edge.tether.dev/offline:NoSchedule from the moment it stands in until
// the edge is back, so that the scheduler places no new pod on a site that
// cannot start it (NoSchedule never evicts: the pods already there stay).
// It must not write a Lease while the edge's own renewals flow (the edge
// is then its only writer), it touches no taint but its own, and it never
// touches pods.
package autonomy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/common/ratelog"
)

// ConditionType is the Node condition this package writes.
const ConditionType corev1.NodeConditionType = "TetherConnected"

// Reasons of the condition.
const (
	ReasonConnected    = "EdgeConnected"
	ReasonDisconnected = "EdgeDisconnected"
	ReasonExpired      = "OfflineAutonomyExpired"
)

// TaintKey is the key of the NoSchedule taint on the Node of an edge that
// CloudCore stands in for (TaintOffline).
const TaintKey = "edge.tether.dev/offline"

// TaintOffline is the taint itself.
var TaintOffline = corev1.Taint{Key: TaintKey, Effect: corev1.TaintEffectNoSchedule}

// taintAttempts bounds the read-modify-write of the Node's taints within
// one look when another writer (the node lifecycle controller, the
// operator, the edge's re-registration) changes the Node in between; the
// next look tries again.
const taintAttempts = 3

// DefaultPeriod is how often the controller looks at the sessions.
const DefaultPeriod = time.Second

// defaultLeaseDuration is used when the Lease names none (kubelet's).
const defaultLeaseDuration = 40 * time.Second

// Sessions tells which nodes have a live session on this replica: the hub.
type Sessions interface {
	Connected() []string
}

// Config configures the controller. Zero values mean the defaults beside
// each field.
type Config struct {
	// Window is how long after a node's session ended CloudCore keeps
	// renewing its Lease. Zero disables the controller (Run returns at
	// once): a lost edge turns Unknown after the node monitor grace period
	// and its pods are evicted after their tolerations, as for kubelets.
	Window time.Duration
	// Trusted says whether CloudCore still trusts node's site (its
	// EdgeNode exists and is allowed). Nil trusts every node.
	Trusted func(node string) bool
	// Period is how often the sessions are looked at. Default
	// DefaultPeriod.
	Period time.Duration
	// FieldManager names CloudCore's writes. Default "tether-autonomy".
	FieldManager string
	// Now defaults to time.Now.
	Now func() time.Time
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer, when set, gets the controller's metrics.
	Registerer prometheus.Registerer
}

// node is what the controller knows of one node it saw connected.
type node struct {
	connected bool      // at the last look
	lastSeen  time.Time // last look that found it connected
	// written is the renewTime CloudCore last wrote (zero: none since the
	// session ended); a Lease whose renewTime differs was renewed by
	// someone else, the edge through another replica.
	written metav1.MicroTime
	// online is the condition status last written (nil: none written).
	online *bool
	// tainted is whether the Node carries TaintOffline as last written or
	// read (nil: not known since this controller saw the node).
	tainted *bool
	expired bool // the window ran out; renewals stopped
}

// settled reports whether the Node is known to say what a connected node's
// says: TetherConnected True and no offline taint.
func (n *node) settled() bool {
	return n.online != nil && *n.online && n.tainted != nil && !*n.tainted
}

// Controller renews the Leases of offline edge nodes. Build it with New.
//
// Invariants: it writes a node's Lease only while the node has no session
// here, it saw the node connected within Window, the node is trusted, and
// the Lease's renewTime is the one it wrote last (or, at the first
// renewal, the edge's). A node it never saw connected is left alone,
// except that the first look adopts the nodes whose TetherConnected
// condition is False/EdgeDisconnected with its lastHeartbeatTime (when the
// edge was last seen) within Window: a CloudCore restarted during an
// outage keeps standing in. Several replicas adopting one node settle on
// one writer through the conditional Lease update.
//
// The offline taint is written only by the look that finds the node
// offline and stood in for (after the condition, so that a controller
// stopped in between adopts the node and finishes), and removed only by
// the look that finds it connected (here, or renewing its Lease through
// another replica). Past the window, or once the node is no longer
// trusted, the taint stays until the edge is back: the site is still
// offline. Taint writes read the Node and write its taint list back
// conditional on the resourceVersion read, keeping every other taint.
type Controller struct {
	cfg      Config
	client   kubernetes.Interface
	sessions Sessions
	logger   *slog.Logger
	lim      *ratelog.Limiter // failed writes repeat every look: logged once a minute per node and write
	nodes    map[string]*node // touched only by Tick's caller
	adopted  bool             // the first Tick has looked for nodes to adopt

	renewals, failures prometheus.Counter
	offline            prometheus.Gauge
}

// New returns a controller writing through client for the nodes sessions
// reports.
func New(client kubernetes.Interface, sessions Sessions, cfg Config) (*Controller, error) {
	if client == nil || sessions == nil {
		return nil, errors.New("autonomy: a Kubernetes client and the sessions are required")
	}
	if cfg.Window < 0 {
		return nil, fmt.Errorf("autonomy: negative window %v", cfg.Window)
	}
	if cfg.Trusted == nil {
		cfg.Trusted = func(string) bool { return true }
	}
	if cfg.Period <= 0 {
		cfg.Period = DefaultPeriod
	}
	if cfg.FieldManager == "" {
		cfg.FieldManager = "tether-autonomy"
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Controller{
		cfg: cfg, client: client, sessions: sessions, logger: cfg.Logger.With("component", "autonomy"), lim: ratelog.New(0, cfg.Now),
		nodes: make(map[string]*node),
		renewals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_autonomy_lease_renewals_total", Help: "Leases of offline edge nodes CloudCore renewed in their place.",
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_autonomy_errors_total", Help: "Failed Lease or Node condition writes for offline edge nodes.",
		}),
		offline: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_autonomy_offline_nodes", Help: "Edge nodes whose Lease CloudCore is renewing now.",
		}),
	}
	if cfg.Registerer != nil {
		for _, m := range []prometheus.Collector{c.renewals, c.failures, c.offline} {
			if err := cfg.Registerer.Register(m); err != nil {
				return nil, fmt.Errorf("register autonomy metrics: %w", err)
			}
		}
	}
	return c, nil
}

// Run looks at the sessions every Period until ctx ends. With a zero
// Window it returns at once.
func (c *Controller) Run(ctx context.Context) error {
	if c.cfg.Window == 0 {
		return nil
	}
	t := time.NewTicker(c.cfg.Period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			c.Tick(ctx)
		}
	}
}

// Tick does one look: it notes which nodes are connected, writes the
// condition on transitions and renews the Leases that are due. Errors are
// counted and logged; the next tick tries again (the state is levels, not
// edges: a failed condition write is written again).
func (c *Controller) Tick(ctx context.Context) {
	now := c.cfg.Now()
	if !c.adopted {
		c.adopt(ctx, now)
	}
	live := make(map[string]bool)
	for _, name := range c.sessions.Connected() {
		live[name] = true
		n := c.nodes[name]
		if n == nil {
			n = &node{}
			c.nodes[name] = n
		}
		n.connected, n.lastSeen, n.written, n.expired = true, now, metav1.MicroTime{}, false
		if !n.settled() {
			c.back(ctx, name, n, now)
		}
	}
	offline := 0
	for name, n := range c.nodes {
		if live[name] {
			continue
		}
		n.connected = false
		switch {
		case !c.cfg.Trusted(name):
			c.logger.Info("offline autonomy ended", "node", name, "reason", "not trusted")
			delete(c.nodes, name)
		case now.Sub(n.lastSeen) > c.cfg.Window:
			if !n.expired {
				n.expired = true
				c.logger.Info("offline autonomy ended", "node", name, "reason", "window expired", "offline_since", n.lastSeen)
				c.condition(ctx, name, n, false, ReasonExpired, fmt.Sprintf("the edge has been offline since %s, longer than the offline autonomy window %s; CloudCore no longer renews its lease", n.lastSeen.UTC().Format(time.RFC3339), c.cfg.Window), now)
			}
		default:
			offline++
			if n.online == nil || *n.online {
				c.condition(ctx, name, n, false, ReasonDisconnected, fmt.Sprintf("the edge has been offline since %s; CloudCore renews its lease until %s", n.lastSeen.UTC().Format(time.RFC3339), n.lastSeen.Add(c.cfg.Window).UTC().Format(time.RFC3339)), now)
			}
			if n.online != nil && !*n.online && (n.tainted == nil || !*n.tainted) {
				c.taint(ctx, name, n, nil, true)
			}
			if err := c.renew(ctx, name, n, now); err != nil {
				c.fail(ctx, "renew lease", name, err)
			}
		}
	}
	c.offline.Set(float64(offline))
}

// adopt takes on the nodes a CloudCore was standing in for when it
// stopped (their condition says so). A failed list is retried next look.
func (c *Controller) adopt(ctx context.Context, now time.Time) {
	list, err := c.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		c.fail(ctx, "list nodes to adopt", "", err)
		return
	}
	c.adopted = true
	offline := false
	for i := range list.Items {
		for _, cond := range list.Items[i].Status.Conditions {
			if cond.Type != ConditionType || cond.Status != corev1.ConditionFalse || cond.Reason != ReasonDisconnected ||
				now.Sub(cond.LastHeartbeatTime.Time) > c.cfg.Window {
				continue
			}
			name := list.Items[i].Name
			if _, ok := c.nodes[name]; !ok {
				tainted := slices.ContainsFunc(list.Items[i].Spec.Taints, isOffline)
				c.nodes[name] = &node{lastSeen: cond.LastHeartbeatTime.Time, online: &offline, tainted: &tainted}
				c.logger.Info("offline autonomy adopted", "node", name, "offline_since", cond.LastHeartbeatTime.Time)
			}
		}
	}
}

// renew writes the Lease's renewTime when a quarter of its duration has
// passed since the last renewal, conditional on the resourceVersion it
// read: a conflict or a renewTime it did not write means another writer
// (the edge through another replica) is renewing, and the node is
// forgotten, so there is one writer at a time.
func (c *Controller) renew(ctx context.Context, name string, n *node, now time.Time) error {
	leases := c.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	l, err := leases.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("read lease %s: %w", name, err)
	}
	if !n.written.IsZero() && (l.Spec.RenewTime == nil || !l.Spec.RenewTime.Equal(&n.written)) {
		c.elsewhere(ctx, name, n, now)
		return nil
	}
	if l.Spec.RenewTime != nil && now.Sub(l.Spec.RenewTime.Time) < leaseDuration(l)/4 {
		return nil
	}
	renew := metav1.NewMicroTime(now)
	l.Spec.RenewTime = &renew
	l, err = leases.Update(ctx, l, metav1.UpdateOptions{FieldManager: c.cfg.FieldManager})
	if apierrors.IsConflict(err) {
		c.elsewhere(ctx, name, n, now)
		return nil
	}
	if err != nil {
		return fmt.Errorf("renew lease %s: %w", name, err)
	}
	n.written = *l.Spec.RenewTime
	c.renewals.Inc()
	return nil
}

func leaseDuration(l *coordinationv1.Lease) time.Duration {
	if l.Spec.LeaseDurationSeconds == nil || *l.Spec.LeaseDurationSeconds <= 0 {
		return defaultLeaseDuration
	}
	return time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
}

// elsewhere forgets a node whose Lease someone else renews: the edge,
// through another replica. That replica writes the node's condition and
// removes its taint; so does this one, once, in case its own offline
// writes landed after the other's.
func (c *Controller) elsewhere(ctx context.Context, name string, n *node, now time.Time) {
	c.logger.Info("offline autonomy ended", "node", name, "reason", "lease renewed elsewhere")
	delete(c.nodes, name)
	c.back(ctx, name, n, now)
}

// back makes the Node of a connected edge say so: TetherConnected True and
// no offline taint. It reads the Node first and writes only what differs.
// A Node that does not exist yet (the edge's registration is on its way)
// is looked at again next time; it is not a failure.
func (c *Controller) back(ctx context.Context, name string, n *node, now time.Time) {
	cur, err := c.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return
	}
	if err != nil {
		c.fail(ctx, "read node", name, err)
		return
	}
	if cond := conditionOf(cur, ConditionType); cond != nil && cond.Status == corev1.ConditionTrue {
		online := true
		n.online = &online
	} else {
		c.condition(ctx, name, n, true, ReasonConnected, "the edge has a session with CloudCore", now)
	}
	c.taint(ctx, name, n, cur, false)
}

// taint adds (want) or removes TaintOffline on the Node, starting from cur
// when given (else it reads the Node), keeping every other taint; the
// write is conditional on the resourceVersion read and is tried again on a
// conflict, at most taintAttempts times in one look.
func (c *Controller) taint(ctx context.Context, name string, n *node, cur *corev1.Node, want bool) {
	nodes := c.client.CoreV1().Nodes()
	var err error
	for range taintAttempts {
		if cur == nil {
			if cur, err = nodes.Get(ctx, name, metav1.GetOptions{}); err != nil {
				err = fmt.Errorf("read node: %w", err)
				break
			}
		}
		if slices.ContainsFunc(cur.Spec.Taints, isOffline) == want {
			n.tainted = &want
			return
		}
		taints := slices.DeleteFunc(slices.Clone(cur.Spec.Taints), isOffline)
		if want {
			taints = append(taints, TaintOffline)
		}
		var patch []byte
		patch, err = json.Marshal(map[string]any{
			"metadata": map[string]any{"resourceVersion": cur.ResourceVersion},
			"spec":     map[string]any{"taints": taints},
		})
		if err != nil {
			break
		}
		_, err = nodes.Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: c.cfg.FieldManager})
		if err == nil {
			n.tainted = &want
			c.logger.Info("node offline taint changed", "node", name, "tainted", want)
			return
		}
		if !apierrors.IsConflict(err) {
			err = fmt.Errorf("write taints: %w", err)
			break
		}
		cur = nil // someone else wrote the Node: read it again
	}
	c.fail(ctx, "write offline taint", name, fmt.Errorf("set tainted %v: %w", want, err))
}

// fail counts a failed API call and logs it, once a minute per call and
// node (the next look makes the call again). A call cut short because ctx
// ended (CloudCore stopping) is neither.
func (c *Controller) fail(ctx context.Context, call, node string, err error) {
	if ctx.Err() != nil {
		return
	}
	c.failures.Inc()
	if ok, suppressed := c.lim.Allow(call + " " + node); ok {
		c.logger.Warn("offline autonomy call failed", "call", call, "node", node, "err", err, "suppressed", suppressed)
	}
}

func isOffline(t corev1.Taint) bool { return t.MatchTaint(&TaintOffline) }

func conditionOf(n *corev1.Node, typ corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// condition writes the TetherConnected condition with a strategic merge
// patch (merged by type, so the edge's conditions stay) and records it.
func (c *Controller) condition(ctx context.Context, name string, n *node, online bool, reason, msg string, now time.Time) {
	status := corev1.ConditionFalse
	if online {
		status = corev1.ConditionTrue
	}
	t := metav1.NewTime(now)
	patch, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{{
		Type: ConditionType, Status: status, Reason: reason, Message: msg, LastHeartbeatTime: metav1.NewTime(n.lastSeen), LastTransitionTime: t,
	}}}})
	if err == nil {
		_, err = c.client.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: c.cfg.FieldManager}, "status")
	}
	if err != nil {
		c.fail(ctx, "write condition", name, err)
		return
	}
	n.online = &online
}
