package hub

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/common/ratelog"
)

// What a replica's Lease carries (docs/protocol.md, "Rebalancing").
const (
	// ReplicaLabel marks the replicas' Leases, and its value is
	// ReplicaLabelValue.
	ReplicaLabel      = "app.kubernetes.io/component"
	ReplicaLabelValue = "cloudcore-replica"
	// SessionsAnnotation is the replica's live session count.
	SessionsAnnotation = "tether.dev/sessions"
	// AddressAnnotation is the address edges reach the replica by (as in
	// edgecore's --cloud), the hint other replicas give; absent: none.
	AddressAnnotation = "tether.dev/address"
)

// Defaults of BalancerConfig.
const (
	DefaultBalancePeriod = 10 * time.Second
	DefaultGoodbyeGrace  = 5 * time.Second
	DefaultMoveFraction  = 0.05
)

// BalancerConfig configures a Balancer. Zero values mean the defaults
// beside each field.
type BalancerConfig struct {
	// Namespace holds the replicas' Leases (CloudCore's). Required.
	Namespace string
	// Identity names this replica. Required (leader.Identity()).
	Identity string
	// Address is how edges reach this replica, for the hints other
	// replicas give; empty: they give none pointing here, and moved
	// edges go on with their own list.
	Address string
	// Period is how often the count is published and a round decided.
	// Default DefaultBalancePeriod; a Lease lives three periods.
	Period time.Duration
	// Grace is how long an edge told goodbye has to close the session
	// before the replica closes it. Default DefaultGoodbyeGrace.
	Grace time.Duration
	// MoveFraction bounds the sessions moved in one round, as a fraction
	// of this replica's (at least one). Default DefaultMoveFraction.
	MoveFraction float64
	// Now defaults to time.Now.
	Now func() time.Time
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer, when set, gets the balancer's metrics.
	Registerer prometheus.Registerer
}

// Balancer publishes this replica's session count and moves sessions to
// less loaded replicas (plan). Build it with NewBalancer.
type Balancer struct {
	cfg    BalancerConfig
	hub    *Hub
	client kubernetes.Interface
	lease  string // this replica's Lease
	logger *slog.Logger
	lim    *ratelog.Limiter

	lastMove time.Time // touched only by Run's goroutine

	moves    prometheus.Counter
	failures *prometheus.CounterVec
}

// NewBalancer returns a balancer of h's sessions.
func NewBalancer(h *Hub, client kubernetes.Interface, cfg BalancerConfig) (*Balancer, error) {
	if h == nil || client == nil {
		return nil, errors.New("hub balancer: a hub and a Kubernetes client are required")
	}
	if cfg.Namespace == "" || cfg.Identity == "" {
		return nil, errors.New("hub balancer: the namespace and identity are required")
	}
	if cfg.Period <= 0 {
		cfg.Period = DefaultBalancePeriod
	}
	if cfg.Grace <= 0 {
		cfg.Grace = DefaultGoodbyeGrace
	}
	if cfg.MoveFraction <= 0 || cfg.MoveFraction > 1 {
		cfg.MoveFraction = DefaultMoveFraction
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	sum := sha256.Sum256([]byte(cfg.Identity))
	b := &Balancer{
		cfg: cfg, hub: h, client: client, lease: "tether-replica-" + hex.EncodeToString(sum[:6]),
		logger: cfg.Logger.With("component", "balancer"), lim: ratelog.New(0, cfg.Now),
		moves: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_hub_rebalance_moves_total", Help: "Sessions this replica told goodbye to move them to a less loaded replica.",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_hub_rebalance_errors_total", Help: "Failed rebalancing steps, by step (publish, list, peer: a peer Lease that does not parse, goodbye).",
		}, []string{"step"}),
	}
	if cfg.Registerer != nil {
		for _, m := range []prometheus.Collector{b.moves, b.failures} {
			if err := cfg.Registerer.Register(m); err != nil {
				return nil, fmt.Errorf("register balancer metrics: %w", err)
			}
		}
	}
	return b, nil
}

// Run publishes and balances every Period until ctx ends, then deletes
// this replica's Lease so that the others stop counting it.
func (b *Balancer) Run(ctx context.Context) error {
	t := time.NewTicker(b.cfg.Period)
	defer t.Stop()
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := b.client.CoordinationV1().Leases(b.cfg.Namespace).Delete(dctx, b.lease, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			b.logger.Warn("cannot delete the replica lease", "lease", b.lease, "err", err)
		}
	}()
	for {
		b.Tick(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Tick is one round: publish, read the peers, move what plan says.
func (b *Balancer) Tick(ctx context.Context) {
	now := b.cfg.Now()
	self := load{identity: b.cfg.Identity, address: b.cfg.Address, sessions: b.hub.Count(), renewed: now, duration: 3 * b.cfg.Period}
	if err := b.publish(ctx, self); err != nil {
		b.fail(ctx, "publish", err)
		return
	}
	list, err := b.client.CoordinationV1().Leases(b.cfg.Namespace).List(ctx, metav1.ListOptions{LabelSelector: ReplicaLabel + "=" + ReplicaLabelValue})
	if err != nil {
		b.fail(ctx, "list", fmt.Errorf("list replica leases: %w", err))
		return
	}
	peers := make([]load, 0, len(list.Items))
	for i := range list.Items {
		if list.Items[i].Name == b.lease {
			continue
		}
		p, err := loadOf(&list.Items[i])
		if err != nil {
			b.fail(ctx, "peer", err)
			continue
		}
		peers = append(peers, p)
	}
	var settled time.Time
	if !b.lastMove.IsZero() {
		settled = b.lastMove.Add(b.cfg.Period)
	}
	m := plan(self, peers, now, settled, b.cfg.MoveFraction)
	if m.count == 0 {
		return
	}
	sessions := b.hub.oldest(m.count, now.Add(-2*b.cfg.Period))
	if len(sessions) == 0 {
		return
	}
	b.lastMove = now
	b.logger.Info("moving sessions to a less loaded replica", "count", len(sessions), "hint", m.hint, "sessions", self.sessions)
	for _, s := range sessions {
		if err := s.Goodbye(ctx, "rebalance", m.hint, b.cfg.Grace); err != nil {
			b.fail(ctx, "goodbye", err)
			continue
		}
		b.moves.Inc()
	}
}

// publish writes this replica's Lease: created the first time, then
// updated (the replica is its only writer).
func (b *Balancer) publish(ctx context.Context, self load) error {
	leases := b.client.CoordinationV1().Leases(b.cfg.Namespace)
	renew := metav1.NewMicroTime(self.renewed)
	seconds := int32(max(1, self.duration/time.Second))
	ann := map[string]string{SessionsAnnotation: strconv.Itoa(self.sessions)}
	if self.address != "" {
		ann[AddressAnnotation] = self.address
	}
	l, err := leases.Get(ctx, b.lease, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{
			Name: b.lease, Namespace: b.cfg.Namespace, Labels: map[string]string{ReplicaLabel: ReplicaLabelValue}, Annotations: ann,
		}, Spec: coordinationv1.LeaseSpec{HolderIdentity: &b.cfg.Identity, LeaseDurationSeconds: &seconds, RenewTime: &renew}}
		_, err = leases.Create(ctx, l, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create replica lease %s: %w", b.lease, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("read replica lease %s: %w", b.lease, err)
	}
	l.Annotations = ann
	l.Labels = map[string]string{ReplicaLabel: ReplicaLabelValue}
	l.Spec.HolderIdentity, l.Spec.LeaseDurationSeconds, l.Spec.RenewTime = &b.cfg.Identity, &seconds, &renew
	if _, err := leases.Update(ctx, l, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("renew replica lease %s: %w", b.lease, err)
	}
	return nil
}

// loadOf reads a peer's Lease; one that does not say what a replica's
// Lease says is refused with the reason.
func loadOf(l *coordinationv1.Lease) (load, error) {
	if l.Spec.HolderIdentity == nil || l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil || *l.Spec.LeaseDurationSeconds <= 0 {
		return load{}, fmt.Errorf("replica lease %s: holder, renew time or duration missing", l.Name)
	}
	n, err := strconv.Atoi(l.Annotations[SessionsAnnotation])
	if err != nil || n < 0 {
		return load{}, fmt.Errorf("replica lease %s: annotation %s=%q is not a session count", l.Name, SessionsAnnotation, l.Annotations[SessionsAnnotation])
	}
	return load{
		identity: *l.Spec.HolderIdentity, address: l.Annotations[AddressAnnotation], sessions: n,
		renewed: l.Spec.RenewTime.Time, duration: time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second,
	}, nil
}

// fail counts a failed step and logs it once a minute per step; the next
// round tries again. A step cut short because ctx ended is neither.
func (b *Balancer) fail(ctx context.Context, step string, err error) {
	if ctx.Err() != nil {
		return
	}
	b.failures.WithLabelValues(step).Inc()
	if ok, suppressed := b.lim.Allow(step); ok {
		b.logger.Warn("rebalancing step failed", "step", step, "err", err, "suppressed", suppressed)
	}
}
