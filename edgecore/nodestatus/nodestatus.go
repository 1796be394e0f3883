// Package nodestatus reports the edge node to the cloud: it registers the
// Node (capacity, allocatable, addresses, labels) once per start, renews
// the node's Lease as a heartbeat, and refreshes the Ready condition. It
// only publishes into the durable outbox, so reports made while offline
// wait there (newest per object) and reach the cloud on reconnect. A
// report that cannot be queued (the store is busy or the disk full) is
// logged, counted and made again at the next report; it never stops the
// reporter.
package nodestatus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/edgecore/store"
)

// Publisher queues an upstream write (the syncer).
type Publisher interface {
	Publish(ctx context.Context, item store.OutboxItem) error
}

// Config configures a Reporter; zero values mean the defaults beside them.
type Config struct {
	// Node is this node's name. Required.
	Node string
	// Labels are added to the Node at registration.
	Labels map[string]string
	// LeaseDuration is the lease's duration; it is renewed every quarter
	// of it. Default 40s (as kubelet).
	LeaseDuration time.Duration
	// StatusEvery is how often the Ready condition is refreshed. Default 1m.
	StatusEvery time.Duration
	// MemoryBytes overrides the memory capacity (default: /proc/meminfo).
	MemoryBytes int64
	// Now defaults to time.Now.
	Now func() time.Time
	// Registerer, when set, gets the reporter's metrics.
	Registerer prometheus.Registerer
}

// Reporter publishes the node's registration, lease and status.
type Reporter struct {
	cfg      Config
	pub      Publisher
	logger   *slog.Logger
	lim      *ratelog.Limiter
	failures *prometheus.CounterVec
}

// New returns a reporter. A nil logger discards logs.
func New(cfg Config, pub Publisher, logger *slog.Logger) (*Reporter, error) {
	if cfg.Node == "" {
		return nil, errors.New("nodestatus config: Node is required")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if cfg.LeaseDuration <= 0 {
		cfg.LeaseDuration = 40 * time.Second
	}
	if cfg.StatusEvery <= 0 {
		cfg.StatusEvery = time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MemoryBytes <= 0 {
		cfg.MemoryBytes = memTotal()
	}
	failures := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_edge_nodestatus_publish_failures_total",
		Help: "Node and lease reports that could not be queued in the outbox (made again at the next report), by report.",
	}, []string{"report"})
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(failures); err != nil {
			return nil, fmt.Errorf("register nodestatus metrics: %w", err)
		}
	}
	return &Reporter{cfg: cfg, pub: pub, logger: logger.With("component", "nodestatus"), lim: ratelog.New(0, nil), failures: failures}, nil
}

// Run registers the node, then renews its lease and status until ctx ends.
// A report that fails is made again at the next report (a registration
// that failed: at every lease renewal until it succeeds); Run returns only
// when ctx ends, with nil.
func (r *Reporter) Run(ctx context.Context) error {
	lease := time.NewTicker(r.cfg.LeaseDuration / 4)
	defer lease.Stop()
	status := time.NewTicker(r.cfg.StatusEvery)
	defer status.Stop()
	registered := r.report(ctx, "node", r.publishNode(ctx, message.OpUpsert))
	r.report(ctx, "lease", r.publishLease(ctx))
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-lease.C:
			if !registered {
				registered = r.report(ctx, "node", r.publishNode(ctx, message.OpUpsert))
			}
			r.report(ctx, "lease", r.publishLease(ctx))
		case <-status.C:
			if registered {
				r.report(ctx, "status", r.publishNode(ctx, message.OpStatus))
			}
		}
	}
}

// report counts and logs (rate-limited) a failed report; it returns
// whether the report was queued.
func (r *Reporter) report(ctx context.Context, what string, err error) bool {
	if err == nil {
		return true
	}
	if ctx.Err() != nil {
		return false // stopping: not a failure
	}
	r.failures.WithLabelValues(what).Inc()
	if ok, suppressed := r.lim.Allow(what); ok {
		r.logger.Warn("node report not queued; retrying at the next report", "report", what, "err", err, "suppressed", suppressed)
	}
	return false
}

// Node returns the Node object this reporter registers.
func (r *Reporter) Node() *corev1.Node {
	now := metav1.NewTime(r.cfg.Now())
	cpu := resource.NewQuantity(int64(runtime.NumCPU()), resource.DecimalSI)
	mem := resource.NewQuantity(r.cfg.MemoryBytes, resource.BinarySI)
	pods := resource.NewQuantity(110, resource.DecimalSI)
	res := corev1.ResourceList{corev1.ResourceCPU: *cpu, corev1.ResourceMemory: *mem, corev1.ResourcePods: *pods}
	n := &corev1.Node{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Node"},
		ObjectMeta: metav1.ObjectMeta{Name: r.cfg.Node, Labels: map[string]string{"kubernetes.io/hostname": r.cfg.Node, "kubernetes.io/os": runtime.GOOS, "kubernetes.io/arch": runtime.GOARCH}},
		Status: corev1.NodeStatus{
			Capacity:    res,
			Allocatable: res.DeepCopy(),
			Addresses:   addresses(r.cfg.Node),
			Conditions: []corev1.NodeCondition{{
				Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "EdgeCoreReady",
				Message: "edgecore is running", LastHeartbeatTime: now, LastTransitionTime: now,
			}},
			NodeInfo: corev1.NodeSystemInfo{OperatingSystem: runtime.GOOS, Architecture: runtime.GOARCH, KubeletVersion: "tether-edgecore"},
		},
	}
	for k, v := range r.cfg.Labels {
		n.Labels[k] = v
	}
	return n
}

func (r *Reporter) publishNode(ctx context.Context, op message.Op) error {
	data, err := json.Marshal(r.Node())
	if err != nil {
		return fmt.Errorf("encode node: %w", err)
	}
	return r.pub.Publish(ctx, store.OutboxItem{Op: op, Resource: message.Resource{Version: "v1", Kind: "Node", Name: r.cfg.Node}, Data: data})
}

func (r *Reporter) publishLease(ctx context.Context) error {
	now := metav1.NewMicroTime(r.cfg.Now())
	secs := int32(r.cfg.LeaseDuration / time.Second)
	holder := r.cfg.Node
	l := coordinationv1.Lease{
		TypeMeta:   metav1.TypeMeta{APIVersion: "coordination.k8s.io/v1", Kind: "Lease"},
		ObjectMeta: metav1.ObjectMeta{Name: r.cfg.Node, Namespace: "kube-node-lease"},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &secs, RenewTime: &now},
	}
	data, err := json.Marshal(&l)
	if err != nil {
		return fmt.Errorf("encode lease: %w", err)
	}
	return r.pub.Publish(ctx, store.OutboxItem{
		Op:       message.OpUpsert,
		Resource: message.Resource{Group: "coordination.k8s.io", Version: "v1", Kind: "Lease", Namespace: "kube-node-lease", Name: r.cfg.Node},
		Data:     data,
	})
}

func addresses(host string) []corev1.NodeAddress {
	out := []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: host}}
	ifaces, err := net.InterfaceAddrs()
	if err != nil {
		return out
	}
	for _, a := range ifaces {
		if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() && ipn.IP.To4() != nil {
			out = append(out, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ipn.IP.String()})
		}
	}
	return out
}
