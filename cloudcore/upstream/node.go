package upstream

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tetheredge/tether/cloudcore/autonomy"
	"github.com/tetheredge/tether/common/message"
)

// What an edge may write on its Node follows Kubernetes' NodeRestriction
// admission (plugin/pkg/admission/noderestriction) for kubelets, because a
// CloudCore writing with its own broad credentials must not give an edge
// more than the cluster would give the kubelet on that machine:
//
//   - Labels: an edge may set only labels a kubelet may set on itself
//     (kubeletMaySet), on registration and re-registration alike. A
//     payload with any other label is refused as a whole, with the
//     offending keys named, as NodeRestriction answers 403 to the whole
//     request: dropping them silently and writing the rest would leave an
//     edge configured with --node-labels running without the labels its
//     workloads select on, and nobody told. A key the operator also sets
//     (Config.Labels) is not the edge's to decide and is not checked: the
//     operator's value is written.
//   - Taints: only when the Node is created, and only with keys in
//     Config.RegisterTaintKeys (kubelet's --register-with-taints); a
//     payload with another taint is refused. NodeRestriction forbids a
//     kubelet to change taints after creation, so re-registration never
//     writes the edge's taints: it cannot clear the operator's, nor the
//     node lifecycle controller's.
//   - The rest of the spec: at creation the edge may set what a kubelet
//     registers with (podCIDR and podCIDRs, providerID, unschedulable for
//     --register-schedulable=false); a configSource is refused, as
//     NodeRestriction refuses it. After creation the spec is never taken
//     from the edge: no unschedulable flips, no podCIDR or providerID
//     changes (the API server makes those immutable once set anyway).
//   - Metadata other than labels (annotations, owner references,
//     finalizers) is never taken from the edge; the cloud sets the name
//     and the edge label.
//   - Status: the edge's, written through the status subresource with a
//     strategic merge patch, as a kubelet writes it: conditions merge by
//     type, so the edge's own (Ready, and any other it reports) replace
//     theirs and the ones CloudCore writes (autonomy.ConditionType) stay;
//     addresses are replaced as a whole (their merge key, type, is not
//     unique: kubelet replaces them the same way). An edge may not write
//     CloudCore's condition: a payload carrying it is refused whole.
//
// The operator's labels and taints (the EdgeNode's) are applied at every
// registration and win over the edge's.

// kubeletLabels are the label keys a kubelet may set on its own Node
// besides the kubelet.kubernetes.io and node.kubernetes.io namespaces (the
// list of k8s.io/kubelet/pkg/apis).
var kubeletLabels = []string{
	corev1.LabelHostname,
	corev1.LabelTopologyZone, corev1.LabelTopologyRegion,
	corev1.LabelFailureDomainBetaZone, corev1.LabelFailureDomainBetaRegion,
	corev1.LabelInstanceType, corev1.LabelInstanceTypeStable,
	corev1.LabelOSStable, corev1.LabelArchStable,
	"beta.kubernetes.io/os", "beta.kubernetes.io/arch",
}

// kubeletMaySet reports whether NodeRestriction lets a kubelet set the
// label key on its own Node: never in node-restriction.kubernetes.io (or a
// subdomain of it), which exists so that operators can label nodes in a
// way nodes cannot forge; under kubernetes.io and k8s.io (and their
// subdomains) only the kubelet's own labels and namespaces; anything
// outside those domains, including unprefixed keys.
func kubeletMaySet(key string) bool {
	ns, _, ok := strings.Cut(key, "/")
	if !ok {
		return true
	}
	switch {
	case inDomain(ns, corev1.LabelNamespaceNodeRestriction):
		return false
	case !inDomain(ns, "kubernetes.io") && !inDomain(ns, "k8s.io"):
		return true
	case slices.Contains(kubeletLabels, key):
		return true
	}
	return inDomain(ns, corev1.LabelNamespaceSuffixKubelet) || inDomain(ns, corev1.LabelNamespaceSuffixNode)
}

// inDomain reports whether the label prefix ns is domain or a subdomain.
func inDomain(ns, domain string) bool {
	return ns == domain || strings.HasSuffix(ns, "."+domain)
}

func (w *Writer) node(ctx context.Context, name string, m *message.Message) error {
	var n corev1.Node
	if err := json.Unmarshal(m.Payload, &n); err != nil {
		return forbidden(reasonBadPayload, "node %q: payload is not a Node: %v", name, err)
	}
	if slices.ContainsFunc(n.Status.Conditions, func(c corev1.NodeCondition) bool { return c.Type == autonomy.ConditionType }) {
		return forbidden(reasonField, "node %q may not set the node condition %s (CloudCore's)", name, autonomy.ConditionType)
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
		return forbidden(reasonNotOwn, "node %q may not %s its Node", name, m.Op)
	}
	return w.register(ctx, name, &n)
}

// register creates the node's Node from the edge's, or brings an existing
// one up to date with the operator's labels and taints and the edge's
// allowed labels; then it writes the edge's status.
func (w *Writer) register(ctx context.Context, name string, edge *corev1.Node) error {
	labels, err := w.labels(name, edge.Labels)
	if err != nil {
		return err
	}
	if edge.Spec.ConfigSource != nil { //nolint:staticcheck // deprecated, yet NodeRestriction still refuses it and the API still has it
		return forbidden(reasonConfigSource, "node %q may not set spec.configSource", name)
	}
	var bad []string
	for _, t := range edge.Spec.Taints {
		if !slices.Contains(w.cfg.RegisterTaintKeys, t.Key) {
			bad = append(bad, t.ToString())
		}
	}
	if len(bad) > 0 {
		return forbidden(reasonTaint, "node %q may not register with taints %s (allowed keys: %v)",
			name, strings.Join(bad, ", "), w.cfg.RegisterTaintKeys)
	}
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.NodeSpec{
			PodCIDR: edge.Spec.PodCIDR, PodCIDRs: edge.Spec.PodCIDRs, ProviderID: edge.Spec.ProviderID,
			Unschedulable: edge.Spec.Unschedulable,
			Taints:        w.operatorTaints(name, slices.Clone(edge.Spec.Taints)),
		},
	}
	_, err = w.client.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{FieldManager: w.cfg.FieldManager})
	if apierrors.IsAlreadyExists(err) {
		err = w.reregister(ctx, name, labels)
	} else {
		err = apiError("create node "+name, err, false)
	}
	if err != nil {
		return err
	}
	// Create ignores status: write it through the subresource.
	return w.patchNodeStatus(ctx, name, edge.Status)
}

// reregister adds labels and the operator's taints to an existing Node,
// keeping the rest of it. It reads the Node from the catalog's cache (a
// GET only when the Node is not an edge node yet), and writes only if
// something changes, conditionally on the version read: a conflict (a
// stale cache) is transient and the edge sends the registration again.
func (w *Writer) reregister(ctx context.Context, name string, labels map[string]string) error {
	var cur *corev1.Node
	if nc, ok := w.binding.(NodeCache); ok {
		cur, _ = nc.Node(name)
	}
	if cur == nil {
		var err error
		if cur, err = w.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{}); err != nil {
			return apiError("read node "+name, err, false)
		}
	}
	return w.relabel(ctx, cur, labels)
}

// relabel writes cur with labels and the operator's taints put in, if
// that changes anything.
func (w *Writer) relabel(ctx context.Context, cur *corev1.Node, labels map[string]string) error {
	next := cur.DeepCopy()
	if next.Labels == nil {
		next.Labels = make(map[string]string, len(labels))
	}
	maps.Copy(next.Labels, labels)
	next.Spec.Taints = w.operatorTaints(cur.Name, next.Spec.Taints)
	if maps.Equal(next.Labels, cur.Labels) && slices.EqualFunc(next.Spec.Taints, cur.Spec.Taints, func(a, b corev1.Taint) bool { return a.MatchTaint(&b) && a.Value == b.Value }) {
		return nil
	}
	_, err := w.client.CoreV1().Nodes().Update(ctx, next, metav1.UpdateOptions{FieldManager: w.cfg.FieldManager})
	return apiError("update node "+cur.Name, err, false)
}

// Settle brings node's existing Node up to date with the operator's labels
// and taints (its EdgeNode) and the edge label, as a registration would:
// CloudCore calls it when the edge's session starts, since an edge whose
// Node the cloud already holds as it would register it sends no
// registration (edgecore/nodestatus), while the operator may have
// relabelled it meanwhile. A Node not registered yet is left to the
// registration. It writes only when something changes, and reads from the
// catalog's cache only: sessions start once it is synced, so a Node it
// does not hold is no edge node yet, which the edge registers (it was not
// sent that Node), and a session start costs no request. Without a
// NodeCache it GETs the Node.
func (w *Writer) Settle(ctx context.Context, name string) error {
	labels, err := w.labels(name, nil)
	if err != nil {
		return err
	}
	if nc, ok := w.binding.(NodeCache); ok {
		cur, cached := nc.Node(name)
		if !cached {
			return nil
		}
		return w.relabel(ctx, cur, labels)
	}
	err = w.reregister(ctx, name, labels)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// labels returns the labels to write on node's Node: the edge's (each one
// a kubelet may set, else the whole write is refused), overridden by the
// operator's, and the edge label.
func (w *Writer) labels(node string, edge map[string]string) (map[string]string, error) {
	var operator map[string]string
	if w.cfg.Labels != nil {
		operator = w.cfg.Labels(node)
	}
	out := make(map[string]string, len(edge)+len(operator)+1)
	var bad []string
	for k, v := range edge {
		if _, ok := operator[k]; ok {
			continue
		}
		if !kubeletMaySet(k) {
			bad = append(bad, k)
			continue
		}
		out[k] = v
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		return nil, forbidden(reasonLabel, "node %q may not set labels %s", node, strings.Join(bad, ", "))
	}
	maps.Copy(out, operator)
	out[w.cfg.EdgeLabel] = ""
	return out, nil
}

// operatorTaints returns taints with the operator's taints for node put
// in: each replaces the taint with the same key and effect, or is added.
func (w *Writer) operatorTaints(node string, taints []corev1.Taint) []corev1.Taint {
	if w.cfg.Taints == nil {
		return taints
	}
	for _, t := range w.cfg.Taints(node) {
		i := slices.IndexFunc(taints, func(c corev1.Taint) bool { return c.MatchTaint(&t) })
		if i < 0 {
			taints = append(taints, t)
		} else {
			taints[i] = t
		}
	}
	return taints
}

// patchNodeStatus writes the edge's status with a strategic merge patch:
// the conditions it carries replace those of the same type and the others
// (CloudCore's) stay, and a reason or message it leaves out is cleared;
// its addresses replace the Node's (the "$patch":
// "replace" directive, since addresses' merge key is not unique); maps
// (capacity, allocatable) and nodeInfo merge field by field as before.
func (w *Writer) patchNodeStatus(ctx context.Context, name string, st corev1.NodeStatus) error {
	status, err := toMap(st)
	if err != nil {
		return fmt.Errorf("encode node status %s: %w", name, err)
	}
	conds, _ := status["conditions"].([]any)
	for _, c := range conds {
		// A field the edge left out is cleared, not kept from the old
		// condition of that type (merged elements merge field by field).
		if c, ok := c.(map[string]any); ok {
			for _, k := range []string{"reason", "message"} {
				if _, ok := c[k]; !ok {
					c[k] = nil
				}
			}
		}
	}
	if addrs, ok := status["addresses"].([]any); ok {
		status["addresses"] = append([]any{map[string]any{"$patch": "replace"}}, addrs...)
	}
	patch, err := json.Marshal(map[string]any{"status": status})
	if err != nil {
		return fmt.Errorf("encode node status %s: %w", name, err)
	}
	_, err = w.client.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: w.cfg.FieldManager}, "status")
	return apiError("write node status "+name, err, false)
}

// toMap is v as the generic JSON object it encodes to.
func toMap(v any) (map[string]any, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	return m, json.Unmarshal(b, &m)
}
