// Package upstream writes to the API server what edge nodes ask the cloud
// to write on their behalf (node registration and status, the node's
// lease, pod status), after checking that the node may make that write. It
// is the only place CloudCore writes for an edge, and it never writes
// anything to track sync progress.
package upstream

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
)

// LeaseNamespace is where node heartbeats live, as for kubelets.
const LeaseNamespace = "kube-node-lease"

// Binding answers whether an object belongs to a node now (the catalog).
type Binding interface {
	Belongs(node string, key objsync.Key) bool
}

// Config configures a Writer.
type Config struct {
	// EdgeLabel is set on every Node an edge registers, so the catalog
	// treats it as an edge node. Required.
	EdgeLabel string
	// Labels, when set, returns labels the operator wants on node's Node
	// (the EdgeNode's spec.labels); they override the edge's own.
	Labels func(node string) map[string]string
	// FieldManager names Tether in managedFields. Default "tether-cloudcore".
	FieldManager string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Writer applies upstream messages with a Kubernetes client.
type Writer struct {
	client  kubernetes.Interface
	binding Binding
	cfg     Config
	logger  *slog.Logger
}

// New returns a writer.
func New(client kubernetes.Interface, binding Binding, cfg Config) (*Writer, error) {
	if cfg.EdgeLabel == "" {
		return nil, fmt.Errorf("upstream config: EdgeLabel is required")
	}
	if cfg.FieldManager == "" {
		cfg.FieldManager = "tether-cloudcore"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Writer{client: client, binding: binding, cfg: cfg, logger: cfg.Logger.With("component", "upstream")}, nil
}

func forbidden(node, format string, args ...any) error {
	return fmt.Errorf("%w: node %q: %s", dispatch.ErrForbidden, node, fmt.Sprintf(format, args...))
}

// Apply authorises and performs one upstream write. A node may write only
// its own Node (create, labels, status), its own Lease, and the status of
// pods bound to it; anything else returns an error wrapping
// dispatch.ErrForbidden and writes nothing.
func (w *Writer) Apply(ctx context.Context, node string, m *message.Message) error {
	r := m.Resource
	switch {
	case r.Group == "" && r.Kind == "Node":
		if r.Name != node || r.Namespace != "" {
			return forbidden(node, "may not write Node %q", r.Name)
		}
		return w.node(ctx, node, m)
	case r.Group == "coordination.k8s.io" && r.Kind == "Lease":
		if r.Name != node || r.Namespace != LeaseNamespace {
			return forbidden(node, "may not write Lease %s/%s", r.Namespace, r.Name)
		}
		return w.lease(ctx, node, m)
	case r.Group == "" && r.Kind == "Pod":
		if m.Op != message.OpStatus {
			return forbidden(node, "may only write pod status, not %s", m.Op)
		}
		if !w.binding.Belongs(node, objsync.KeyOf(r)) {
			return forbidden(node, "pod %s/%s is not bound to it", r.Namespace, r.Name)
		}
		return w.podStatus(ctx, m)
	default:
		return forbidden(node, "may not write %s", r.String())
	}
}

func (w *Writer) node(ctx context.Context, name string, m *message.Message) error {
	var n corev1.Node
	if err := json.Unmarshal(m.Payload, &n); err != nil {
		return forbidden(name, "node payload is not a Node: %v", err)
	}
	switch m.Op {
	case message.OpStatus:
		err := w.patchNodeStatus(ctx, name, n.Status)
		if !apierrors.IsNotFound(err) {
			return err
		}
		// The registration was coalesced away in the edge's outbox (or the
		// Node was deleted): register again from this full object.
	case message.OpUpsert:
	default:
		return forbidden(name, "op %s on its Node", m.Op)
	}
	// Registration: the cloud decides the name and the edge label.
	n.ObjectMeta = metav1.ObjectMeta{Name: name, Labels: n.Labels}
	if n.Labels == nil {
		n.Labels = map[string]string{}
	}
	if w.cfg.Labels != nil {
		for k, v := range w.cfg.Labels(name) {
			n.Labels[k] = v
		}
	}
	n.Labels[w.cfg.EdgeLabel] = ""
	n.ObjectMeta.Labels = n.Labels
	_, err := w.client.CoreV1().Nodes().Create(ctx, &n, metav1.CreateOptions{FieldManager: w.cfg.FieldManager})
	if apierrors.IsAlreadyExists(err) {
		patch, perr := json.Marshal(map[string]any{"metadata": map[string]any{"labels": n.Labels}, "spec": map[string]any{"podCIDR": n.Spec.PodCIDR}})
		if perr != nil {
			return perr
		}
		if _, err = w.client.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: w.cfg.FieldManager}); err != nil {
			return fmt.Errorf("update node %s: %w", name, err)
		}
		return w.patchNodeStatus(ctx, name, n.Status)
	}
	if err != nil {
		return fmt.Errorf("create node %s: %w", name, err)
	}
	// Create ignores status: write it through the subresource.
	return w.patchNodeStatus(ctx, name, n.Status)
}

func (w *Writer) lease(ctx context.Context, node string, m *message.Message) error {
	var l coordinationv1.Lease
	if err := json.Unmarshal(m.Payload, &l); err != nil {
		return forbidden(node, "lease payload is not a Lease: %v", err)
	}
	patch, err := json.Marshal(map[string]any{"spec": l.Spec})
	if err != nil {
		return err
	}
	leases := w.client.CoordinationV1().Leases(LeaseNamespace)
	_, err = leases.Patch(ctx, node, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: w.cfg.FieldManager})
	if apierrors.IsNotFound(err) {
		l.ObjectMeta = metav1.ObjectMeta{Name: node, Namespace: LeaseNamespace}
		_, err = leases.Create(ctx, &l, metav1.CreateOptions{FieldManager: w.cfg.FieldManager})
	}
	if err != nil {
		return fmt.Errorf("write lease %s: %w", node, err)
	}
	return nil
}

func (w *Writer) podStatus(ctx context.Context, m *message.Message) error {
	var st corev1.PodStatus
	if err := json.Unmarshal(m.Payload, &st); err != nil {
		return fmt.Errorf("%w: pod status payload: %v", dispatch.ErrForbidden, err) //nolint:errorlint // one %w: the sentinel
	}
	patch, err := json.Marshal(map[string]any{"status": st})
	if err != nil {
		return err
	}
	_, err = w.client.CoreV1().Pods(m.Resource.Namespace).Patch(ctx, m.Resource.Name, types.MergePatchType, patch,
		metav1.PatchOptions{FieldManager: w.cfg.FieldManager}, "status")
	if err != nil {
		return fmt.Errorf("write pod status %s/%s: %w", m.Resource.Namespace, m.Resource.Name, err)
	}
	return nil
}

func (w *Writer) patchNodeStatus(ctx context.Context, name string, st corev1.NodeStatus) error {
	patch, err := json.Marshal(map[string]any{"status": st})
	if err != nil {
		return err
	}
	_, err = w.client.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: w.cfg.FieldManager}, "status")
	if err != nil {
		return fmt.Errorf("write node status %s: %w", name, err)
	}
	return nil
}
