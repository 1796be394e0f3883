// Package autonomy keeps an offline edge site's pods where they are: while
// a trusted edge node has no session with any CloudCore replica, CloudCore
// renews the node's Lease in kube-node-lease in the edge's place, for at
// most a configured window, so the node lifecycle controller never marks
// the node Unknown, never taints it unreachable and the taint eviction
// controller evicts nothing. It says so on the Node: condition
// TetherConnected is False, reason EdgeDisconnected, while CloudCore
// stands in, and True, reason EdgeConnected, while the edge has a session;
// and it taints the Node edge.tether.dev/offline:NoSchedule from the
// moment it stands in until the edge is back, so that the scheduler places
// no new pod on a site that cannot start it (NoSchedule never evicts: the
// pods already there stay).
//
// It has two halves. Every replica makes the Nodes of the edges with a
// session here say so (True, untainted), reading them from the informer
// cache and writing only what differs. Standing in runs on one replica at
// a time, the leader of the Lease DefaultLeaseName (cloudcore/leader): it
// learns that a node has no session anywhere from what every replica
// shares, the Node's condition and the node's Lease (not renewed for half
// its duration), and renews Leases only with writes conditional on the
// resourceVersion it read, so that it never overwrites the edge's own
// renewal through any replica. It touches no taint but its own, and it
// never touches pods.
package autonomy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/leader"
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

// DefaultLeaseName is the leader election Lease (in CloudCore's namespace)
// whose holder stands in for offline edges.
const DefaultLeaseName = "tether-autonomy"

// HolderStandIn is the holderIdentity of a node Lease that CloudCore
// renewed in the edge's place. The edge's own renewals (through any
// replica) write its node name there, so the holder tells who renewed
// last whatever the clocks say.
const HolderStandIn = "tether-autonomy"

// DefaultPeriod is how often the controller looks at the sessions.
const DefaultPeriod = time.Second

// Sessions tells which nodes have a live session on this replica: the hub.
type Sessions interface {
	Connected() []string
}

// Nodes is the informer cache of edge Nodes: the catalog. Its objects are
// the cache's and are never modified.
type Nodes interface {
	EdgeNodes() []string
	Node(name string) (*corev1.Node, bool)
}

// Config configures the controller. Zero values mean the defaults beside
// each field.
type Config struct {
	// Window is how long after an edge was last seen CloudCore keeps
	// renewing its Lease. Zero disables the controller (Run returns at
	// once): a lost edge turns Unknown after the node monitor grace period
	// and its pods are evicted after their tolerations, as for kubelets.
	Window time.Duration
	// Trusted says whether CloudCore still trusts node's site (its
	// EdgeNode exists and is allowed). Nil trusts every node.
	Trusted func(node string) bool
	// LeaderElection is the Lease that elects the replica that stands in.
	// Its Name defaults to DefaultLeaseName; its Namespace is required
	// unless Disabled (only right with one CloudCore).
	LeaderElection leader.Config
	// Period is how often both halves look. Default DefaultPeriod.
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

// Controller is both halves of offline autonomy. Build it with New.
//
// Invariants: a Node says True and is untainted only by the replica that
// holds the edge's session (connected.go); it says False and is tainted,
// and the edge's Lease is renewed, only by the leader, only while no
// replica holds a session (standin.go: decide). Every write of the leader
// is conditional on the resourceVersion of the object it decided on, so a
// write made on a view that another writer has since changed (the edge's
// renewal, the connected replica's True) fails and is decided again at the
// next look, from the cache.
type Controller struct {
	cfg      Config
	client   kubernetes.Interface
	sessions Sessions
	nodes    Nodes
	logger   *slog.Logger
	lim      *ratelog.Limiter // failed writes repeat every look: logged once a minute per node and write
	// pending maps a connected node to the resourceVersion of its cached
	// Node when this replica last wrote it: until the cache has moved on
	// from that version the write is not written again. Touched only by
	// the connected look.
	pending map[string]string

	renewals, failures prometheus.Counter
	offline, leading   prometheus.Gauge
}

// New returns a controller writing through client for the nodes sessions
// reports, reading Nodes from nodes.
func New(client kubernetes.Interface, sessions Sessions, nodes Nodes, cfg Config) (*Controller, error) {
	if client == nil || sessions == nil || nodes == nil {
		return nil, errors.New("autonomy: a Kubernetes client, the sessions and the Node cache are required")
	}
	if cfg.Window < 0 {
		return nil, fmt.Errorf("autonomy: negative window %v", cfg.Window)
	}
	if cfg.Trusted == nil {
		cfg.Trusted = func(string) bool { return true }
	}
	if !cfg.LeaderElection.Disabled && cfg.LeaderElection.Name == "" {
		cfg.LeaderElection.Name = DefaultLeaseName
	}
	le, err := cfg.LeaderElection.WithDefaults()
	if err != nil && cfg.Window > 0 {
		return nil, fmt.Errorf("autonomy: %w", err)
	}
	cfg.LeaderElection = le
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
		cfg: cfg, client: client, sessions: sessions, nodes: nodes, logger: cfg.Logger.With("component", "autonomy"), lim: ratelog.New(0, cfg.Now),
		pending: make(map[string]string),
		renewals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_autonomy_lease_renewals_total", Help: "Leases of offline edge nodes CloudCore renewed in their place.",
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_autonomy_errors_total", Help: "Failed Lease, Node condition or taint writes of offline autonomy.",
		}),
		offline: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_autonomy_offline_nodes", Help: "Edge nodes whose Lease this CloudCore stands in for now (only on the leader).",
		}),
		leading: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_autonomy_leader", Help: "1 while this CloudCore holds the offline autonomy leader Lease and stands in for offline edges.",
		}),
	}
	if cfg.Registerer != nil {
		for _, m := range []prometheus.Collector{c.renewals, c.failures, c.offline, c.leading} {
			if err := cfg.Registerer.Register(m); err != nil {
				return nil, fmt.Errorf("register autonomy metrics: %w", err)
			}
		}
	}
	return c, nil
}

// Run runs both halves until ctx ends: the look at this replica's
// sessions every Period, and the campaign for the leader Lease, standing
// in while it holds it. With a zero Window it returns at once.
func (c *Controller) Run(ctx context.Context) error {
	if c.cfg.Window == 0 {
		return nil
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		t := time.NewTicker(c.cfg.Period)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
				c.lookConnected(ctx)
			}
		}
	})
	g.Go(func() error { return leader.Run(ctx, c.client, c.cfg.LeaderElection, c.logger, c.lead) })
	return g.Wait()
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
