// Package upstream writes to the API server what edge nodes ask the cloud
// to write on their behalf (node registration and status, the node's
// lease, pod status), after checking that the node may make that write
// with the rules Kubernetes' NodeRestriction admission applies to kubelets.
// It is the only place CloudCore writes for an edge, and it never writes
// anything to track sync progress.
package upstream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/ratelog"
)

// LeaseNamespace is where node heartbeats live, as for kubelets.
const LeaseNamespace = "kube-node-lease"

// Binding answers whether an object belongs to a node now (the catalog).
type Binding interface {
	// Version returns the uid and resourceVersion of the object named by
	// key if it belongs to node now, from a cache.
	Version(node string, key objsync.Key) (uid, resourceVersion string, ok bool)
}

// NodeCache is an optional capability of a Binding: the cached Node of an
// edge node (the catalog's informer), so that a re-registration reads no
// Node from the API server. Without it, or on a miss, the writer GETs.
type NodeCache interface {
	Node(name string) (*corev1.Node, bool)
}

// Config configures a Writer. Zero values mean the defaults beside each
// field.
type Config struct {
	// EdgeLabel is set on every Node an edge registers, so the catalog
	// treats it as an edge node. Required.
	EdgeLabel string
	// Labels, when set, returns labels the operator wants on node's Node
	// (the EdgeNode's spec.labels). They are applied at every registration
	// and override the edge's own labels with the same key; they may use
	// any key, the edge only the ones a kubelet may set.
	Labels func(node string) map[string]string
	// Taints, when set, returns taints the operator wants on node's Node
	// (the EdgeNode's spec.taints). They are applied at every
	// registration, replacing a taint with the same key and effect; taints
	// added by others (the node lifecycle controller, kubectl) are kept,
	// and a taint removed from the list is not removed from the Node.
	Taints func(node string) []corev1.Taint
	// RegisterTaintKeys are the taint keys an edge may put on its own Node
	// when it first registers it (what kubelet's --register-with-taints
	// does). Default none: a registration carrying any other taint is
	// refused. After registration an edge never changes taints.
	RegisterTaintKeys []string
	// FieldManager names Tether in managedFields. Default "tether-cloudcore".
	FieldManager string
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives the writer's metrics. Nil registers them nowhere.
	Registerer prometheus.Registerer
}

// Writer applies upstream messages with a Kubernetes client. It is safe
// for concurrent use by the sessions of many nodes.
type Writer struct {
	client  kubernetes.Interface
	binding Binding
	cfg     Config
	logger  *slog.Logger
	lim     *ratelog.Limiter
	refused *prometheus.CounterVec
	leases  leaseCache
}

// New returns a writer. Metrics are registered with cfg.Registerer; a
// registration error is returned.
func New(client kubernetes.Interface, binding Binding, cfg Config) (*Writer, error) {
	if binding == nil {
		return nil, errors.New("upstream: a Binding is required")
	}
	if cfg.EdgeLabel == "" {
		return nil, errors.New("upstream config: EdgeLabel is required")
	}
	if cfg.FieldManager == "" {
		cfg.FieldManager = "tether-cloudcore"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.RegisterTaintKeys = slices.Clone(cfg.RegisterTaintKeys)
	w := &Writer{
		client: client, binding: binding, cfg: cfg,
		logger: cfg.Logger.With("component", "upstream"),
		lim:    ratelog.New(0, nil),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_upstream_refused_total",
			Help: "Upstream writes refused for good, by reason: the node may not make them, or the API server rejected them.",
		}, []string{"reason"}),
		leases: leaseCache{last: make(map[string]int64)},
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(w.refused); err != nil {
			return nil, fmt.Errorf("register upstream metrics: %w", err)
		}
	}
	return w, nil
}

// Reasons a write is refused, the values of tether_upstream_refused_total's
// reason label.
const (
	reasonNotOwn       = "not_own_object"  // another node's object, or an op it may not make
	reasonBadPayload   = "bad_payload"     // the payload does not decode
	reasonLabel        = "forbidden_label" // a label a kubelet may not set
	reasonTaint        = "forbidden_taint" // a taint outside RegisterTaintKeys
	reasonConfigSource = "config_source"   // spec.configSource set
	reasonField        = "forbidden_field" // a pod status field, or CloudCore's Node condition, a node may not write
	reasonPodReplaced  = "pod_replaced"    // the pod's uid is not the message's
	reasonPodGone      = "pod_gone"        // the pod no longer exists
	reasonInvalid      = "invalid"         // the API server said 400 or 422
)

// refusal is a final refusal: the error the dispatcher sees wraps sentinel
// (dispatch.ErrForbidden or dispatch.ErrRejected).
type refusal struct {
	sentinel error
	reason   string
	err      error
}

func (r *refusal) Error() string   { return r.sentinel.Error() + ": " + r.err.Error() }
func (r *refusal) Unwrap() []error { return []error{r.sentinel, r.err} }

func forbidden(reason, format string, args ...any) error {
	return &refusal{sentinel: dispatch.ErrForbidden, reason: reason, err: fmt.Errorf(format, args...)}
}

func rejected(reason string, err error) error {
	return &refusal{sentinel: dispatch.ErrRejected, reason: reason, err: err}
}

// apiError classifies an API error per the dispatcher's contract: an
// invalid request (400, 422) is rejected for good, and so is a write to
// a pod that is gone when podGone is set; anything else (5xx, 429,
// timeouts, conflicts) is returned as it is, transient.
func apiError(what string, err error, podGone bool) error {
	if err == nil {
		return nil
	}
	err = fmt.Errorf("%s: %w", what, err)
	switch {
	case apierrors.IsInvalid(err) && invalidField(err, "metadata.uid"):
		return rejected(reasonPodReplaced, err)
	case apierrors.IsInvalid(err), apierrors.IsBadRequest(err):
		return rejected(reasonInvalid, err)
	case podGone && apierrors.IsNotFound(err):
		return rejected(reasonPodGone, err)
	}
	return err
}

// invalidField reports whether an Invalid error names field among its
// causes.
func invalidField(err error, field string) bool {
	var st apierrors.APIStatus
	if !errors.As(err, &st) || st.Status().Details == nil {
		return false
	}
	for _, c := range st.Status().Details.Causes {
		if c.Field == field {
			return true
		}
	}
	return false
}

// Apply authorises and performs one upstream write. A node may write only
// its own Node (registration within the rules of node.go, then status),
// its own Lease, and the status of pods bound to it; anything else returns
// an error wrapping dispatch.ErrForbidden and writes nothing. A write the
// API server refuses for good returns an error wrapping
// dispatch.ErrRejected; any other error is transient. Refusals are counted
// by reason and logged once per node and reason per minute.
func (w *Writer) Apply(ctx context.Context, node string, m *message.Message) error {
	err := w.apply(ctx, node, m)
	var r *refusal
	if errors.As(err, &r) {
		w.refused.WithLabelValues(r.reason).Inc()
		if ok, suppressed := w.lim.Allow(node + "\x00" + r.reason); ok {
			w.logger.Warn("upstream write refused", "node", node, "resource", m.Resource.String(),
				"reason", r.reason, "suppressed", suppressed, "err", err)
		}
	}
	return err
}

func (w *Writer) apply(ctx context.Context, node string, m *message.Message) error {
	r := m.Resource
	switch {
	case r.Group == "" && r.Kind == "Node":
		if r.Name != node || r.Namespace != "" {
			return forbidden(reasonNotOwn, "node %q may not write Node %q", node, r.Name)
		}
		return w.node(ctx, node, m)
	case r.Group == "coordination.k8s.io" && r.Kind == "Lease":
		if r.Name != node || r.Namespace != LeaseNamespace {
			return forbidden(reasonNotOwn, "node %q may not write Lease %s/%s", node, r.Namespace, r.Name)
		}
		return w.lease(ctx, node, m)
	case r.Group == "" && r.Kind == "Pod":
		switch m.Op {
		case message.OpStatus:
			return w.podStatus(ctx, node, m)
		case message.OpDelete:
			return w.podDelete(ctx, node, m)
		default:
			return forbidden(reasonNotOwn, "node %q may only write pod status or finish a pod's deletion, not %s", node, m.Op)
		}
	default:
		return forbidden(reasonNotOwn, "node %q may not write %s", node, r.String())
	}
}
