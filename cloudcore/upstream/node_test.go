package upstream

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"

	"github.com/tetheredge/tether/cloudcore/autonomy"
	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/common/message"
)

func resourcePods() *resource.Quantity { return resource.NewQuantity(110, resource.DecimalSI) }

// TestNodeLabels: an edge sets only the labels NodeRestriction lets a
// kubelet set, on first registration and on re-registration of an
// existing Node alike; a payload with any other label is refused whole
// and nothing is written; the operator's labels win over the edge's.
func TestNodeLabels(t *testing.T) {
	operator := map[string]string{"site": "operator-site", "node-role.kubernetes.io/edge-gpu": ""}
	cases := []struct {
		name      string
		labels    map[string]string
		want      map[string]string // present afterwards (nil: refused)
		reason    string
		forbidden []string // absent afterwards
	}{{
		name:      "control-plane role",
		labels:    map[string]string{"node-role.kubernetes.io/control-plane": "", "app": "x"},
		reason:    reasonLabel,
		forbidden: []string{"node-role.kubernetes.io/control-plane", "app"},
	}, {
		name:      "node-restriction namespace",
		labels:    map[string]string{"node-restriction.kubernetes.io/pci-dss": "true"},
		reason:    reasonLabel,
		forbidden: []string{"node-restriction.kubernetes.io/pci-dss"},
	}, {
		name:      "node-restriction subdomain",
		labels:    map[string]string{"example.node-restriction.kubernetes.io/fence": "a"},
		reason:    reasonLabel,
		forbidden: []string{"example.node-restriction.kubernetes.io/fence"},
	}, {
		name:      "other k8s.io label",
		labels:    map[string]string{"example.k8s.io/tier": "gold"},
		reason:    reasonLabel,
		forbidden: []string{"example.k8s.io/tier"},
	}, {
		name: "kubelet labels",
		labels: map[string]string{
			"kubernetes.io/hostname": "h", "kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64",
			"beta.kubernetes.io/arch": "arm64", "topology.kubernetes.io/zone": "z1", "topology.kubernetes.io/region": "r1",
			"node.kubernetes.io/instance-type": "pi5", "kubelet.kubernetes.io/x": "1", "sub.node.kubernetes.io/y": "2",
			"example.com/rack": "r7", "app": "edge",
		},
		want: map[string]string{
			"kubernetes.io/hostname": "h", "kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64",
			"beta.kubernetes.io/arch": "arm64", "topology.kubernetes.io/zone": "z1", "topology.kubernetes.io/region": "r1",
			"node.kubernetes.io/instance-type": "pi5", "kubelet.kubernetes.io/x": "1", "sub.node.kubernetes.io/y": "2",
			"example.com/rack": "r7", "app": "edge",
		},
	}, {
		name:   "operator labels win",
		labels: map[string]string{"site": "edge-site", "node-role.kubernetes.io/edge-gpu": "forged"},
		want:   map[string]string{"site": "operator-site", "node-role.kubernetes.io/edge-gpu": "", catalog.DefaultEdgeLabel: ""},
	}}
	for _, existing := range []bool{false, true} {
		for _, tc := range cases {
			mode := "register"
			if existing {
				mode = "reregister"
			}
			t.Run(mode+"/"+tc.name, func(t *testing.T) {
				f := newFixture(t, nil, Config{Labels: func(string) map[string]string { return operator }})
				name := nodeName(t, f.admin)
				if existing {
					_, err := f.admin.CoreV1().Nodes().Create(context.Background(), &corev1.Node{
						ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"pre": "1"}},
					}, metav1.CreateOptions{})
					require.NoError(t, err)
				}
				before := f.refused(t, reasonLabel)
				err := f.w.Apply(context.Background(), name, nodeMessage(t, message.OpUpsert, name, edgeNode(name, tc.labels)))
				n := getNode(t, f.admin, name)
				if tc.want == nil {
					requireRefused(t, f, err, dispatch.ErrForbidden, tc.reason, before)
					if !existing {
						require.Nil(t, n, "a refused registration creates no Node")
						return
					}
					for _, k := range tc.forbidden {
						require.NotContains(t, n.Labels, k)
					}
					require.NotContains(t, n.Labels, catalog.DefaultEdgeLabel, "nothing of a refused write is written")
					return
				}
				require.NoError(t, err)
				require.NotNil(t, n)
				for k, v := range tc.want {
					require.Equal(t, v, n.Labels[k], "label %s", k)
				}
				require.Contains(t, n.Labels, catalog.DefaultEdgeLabel)
				if existing {
					require.Equal(t, "1", n.Labels["pre"], "re-registration keeps labels others set")
				}
			})
		}
	}
}

// TestNodeTaints: an edge registers only with taints whose keys the
// operator allows, never changes taints after registration, and the
// operator's taints are put on its Node and win over the edge's.
func TestNodeTaints(t *testing.T) {
	opTaint := corev1.Taint{Key: "tether.dev/site", Value: "operator", Effect: corev1.TaintEffectNoSchedule}
	gpu := corev1.Taint{Key: "example.com/gpu", Value: "true", Effect: corev1.TaintEffectNoSchedule}
	cfg := Config{
		Taints:            func(string) []corev1.Taint { return []corev1.Taint{opTaint} },
		RegisterTaintKeys: []string{gpu.Key},
	}
	ctx := context.Background()

	t.Run("registration with a foreign taint", func(t *testing.T) {
		f := newFixture(t, nil, cfg)
		name := nodeName(t, f.admin)
		n := edgeNode(name, nil)
		n.Spec.Taints = []corev1.Taint{gpu, {Key: "node-role.kubernetes.io/control-plane", Effect: corev1.TaintEffectNoSchedule}}
		err := f.w.Apply(ctx, name, nodeMessage(t, message.OpUpsert, name, n))
		requireRefused(t, f, err, dispatch.ErrForbidden, reasonTaint, 0)
		require.Nil(t, getNode(t, f.admin, name))
	})
	t.Run("registration with allowed taints and the operator's", func(t *testing.T) {
		both := cfg
		both.RegisterTaintKeys = []string{gpu.Key, opTaint.Key}
		f := newFixture(t, nil, both)
		name := nodeName(t, f.admin)
		n := edgeNode(name, nil)
		n.Spec.Taints = []corev1.Taint{gpu, {Key: opTaint.Key, Value: "edge", Effect: opTaint.Effect}}
		require.NoError(t, f.w.Apply(ctx, name, nodeMessage(t, message.OpUpsert, name, n)))
		got := getNode(t, f.admin, name)
		require.Equal(t, 1, countKey(got.Spec.Taints, opTaint.Key), "%v", got.Spec.Taints)
		require.True(t, hasTaint(got.Spec.Taints, gpu), "allowed taint registered: %v", got.Spec.Taints)
		require.True(t, hasTaint(got.Spec.Taints, opTaint), "the operator's value wins: %v", got.Spec.Taints)
	})
	t.Run("registration without taints gets the operator's", func(t *testing.T) {
		f := newFixture(t, nil, cfg)
		name := nodeName(t, f.admin)
		require.NoError(t, f.w.Apply(ctx, name, nodeMessage(t, message.OpUpsert, name, edgeNode(name, nil))))
		require.True(t, hasTaint(getNode(t, f.admin, name).Spec.Taints, opTaint))
	})
	t.Run("re-registration cannot clear taints", func(t *testing.T) {
		f := newFixture(t, nil, cfg)
		name := nodeName(t, f.admin)
		unreachable := corev1.Taint{Key: corev1.TaintNodeUnreachable, Effect: corev1.TaintEffectNoExecute}
		stale := corev1.Taint{Key: opTaint.Key, Value: "old", Effect: opTaint.Effect}
		_, err := f.admin.CoreV1().Nodes().Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.NodeSpec{Taints: []corev1.Taint{unreachable, stale}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		// The edge reports no taints, as after a restart with a new config.
		require.NoError(t, f.w.Apply(ctx, name, nodeMessage(t, message.OpUpsert, name, edgeNode(name, nil))))
		got := getNode(t, f.admin, name).Spec.Taints
		require.Equal(t, 1, countKey(got, opTaint.Key), "the operator's taint replaces the stale one: %v", got)
		require.True(t, hasTaint(got, unreachable), "another controller's taint stays: %v", got)
		require.True(t, hasTaint(got, opTaint), "the operator's taint is brought up to date: %v", got)
	})
}

// countKey counts the taints with key. (The API server's
// TaintNodesByCondition admission adds node.kubernetes.io/not-ready to
// every new Node, so tests do not count all taints.)
func countKey(taints []corev1.Taint, key string) int {
	n := 0
	for _, t := range taints {
		if t.Key == key {
			n++
		}
	}
	return n
}

// TestNodeSpec: the edge's spec is taken only at registration, and only
// what a kubelet may register with; configSource is refused.
func TestNodeSpec(t *testing.T) {
	ctx := context.Background()
	t.Run("configSource", func(t *testing.T) {
		f := newFixture(t, nil, Config{})
		name := nodeName(t, f.admin)
		n := edgeNode(name, nil)
		n.Spec.ConfigSource = &corev1.NodeConfigSource{ConfigMap: &corev1.ConfigMapNodeConfigSource{ //nolint:staticcheck // the deprecated field a node must not set
			Namespace: "kube-system", Name: "kubelet", KubeletConfigKey: "kubelet",
		}}
		err := f.w.Apply(ctx, name, nodeMessage(t, message.OpUpsert, name, n))
		requireRefused(t, f, err, dispatch.ErrForbidden, reasonConfigSource, 0)
		require.Nil(t, getNode(t, f.admin, name))
	})
	t.Run("registration", func(t *testing.T) {
		f := newFixture(t, nil, Config{})
		name := nodeName(t, f.admin)
		n := edgeNode(name, nil)
		n.Spec = corev1.NodeSpec{PodCIDR: "10.77.1.0/24", PodCIDRs: []string{"10.77.1.0/24"}, ProviderID: "tether://" + name, Unschedulable: true}
		require.NoError(t, f.w.Apply(ctx, name, nodeMessage(t, message.OpUpsert, name, n)))
		got := getNode(t, f.admin, name)
		require.Equal(t, n.Spec.PodCIDR, got.Spec.PodCIDR)
		require.Equal(t, n.Spec.ProviderID, got.Spec.ProviderID)
		require.True(t, got.Spec.Unschedulable)
		pods := got.Status.Capacity[corev1.ResourcePods]
		require.Equal(t, int64(110), pods.Value(), "status written through the subresource")
	})
	t.Run("re-registration", func(t *testing.T) {
		f := newFixture(t, nil, Config{})
		name := nodeName(t, f.admin)
		_, err := f.admin.CoreV1().Nodes().Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.NodeSpec{Unschedulable: true}, // cordoned by the operator
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		n := edgeNode(name, nil)
		n.Spec = corev1.NodeSpec{PodCIDR: "10.77.2.0/24", PodCIDRs: []string{"10.77.2.0/24"}, ProviderID: "tether://forged"}
		require.NoError(t, f.w.Apply(ctx, name, nodeMessage(t, message.OpUpsert, name, n)))
		got := getNode(t, f.admin, name)
		require.True(t, got.Spec.Unschedulable, "the edge cannot uncordon itself")
		require.Empty(t, got.Spec.PodCIDR, "the edge cannot set its podCIDR after registration")
		require.Empty(t, got.Spec.ProviderID)
		require.Contains(t, got.Labels, catalog.DefaultEdgeLabel)
	})
	t.Run("status of a missing Node registers it", func(t *testing.T) {
		f := newFixture(t, nil, Config{})
		name := nodeName(t, f.admin)
		require.NoError(t, f.w.Apply(ctx, name, nodeMessage(t, message.OpStatus, name, edgeNode(name, map[string]string{"app": "a"}))))
		got := getNode(t, f.admin, name)
		require.NotNil(t, got)
		require.Equal(t, "a", got.Labels["app"])
	})
	t.Run("another node's Node", func(t *testing.T) {
		f := newFixture(t, nil, Config{})
		name := nodeName(t, f.admin)
		err := f.w.Apply(ctx, "someone-else", nodeMessage(t, message.OpUpsert, name, edgeNode(name, nil)))
		requireRefused(t, f, err, dispatch.ErrForbidden, reasonNotOwn, 0)
		require.Nil(t, getNode(t, f.admin, name))
	})
}

// TestEdgeNodeTaintsStored: the EdgeNode CRD keeps spec.taints (a field
// missing from its schema would be pruned silently), which cloudcore/app
// hands to the writer as Config.Taints.
func TestEdgeNodeTaintsStored(t *testing.T) {
	env := cp.Env(t)
	dyn, err := dynamic.NewForConfig(env.Config)
	require.NoError(t, err)
	nodes := edgenode.NewClient(dyn)
	name := nodeName(t, adminClient(t, env.Config))
	want := []corev1.Taint{{Key: "tether.dev/site", Value: "shop-17", Effect: corev1.TaintEffectNoSchedule}, {Key: "dedicated", Effect: corev1.TaintEffectNoExecute}}
	_, err = nodes.Create(context.Background(), &edgenode.EdgeNode{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: edgenode.Spec{Allowed: true, Taints: want}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = nodes.Delete(context.Background(), name) })
	got, err := nodes.Get(context.Background(), name)
	require.NoError(t, err)
	require.Equal(t, want, got.Spec.Taints)
}

// TestNodeStatusMergesConditions: the edge's status reports merge the
// Node's conditions by type. The edge's own replace theirs (a reason or
// message it leaves out is cleared), CloudCore's TetherConnected stays,
// and the edge may not write TetherConnected itself. Addresses are
// replaced whole, as kubelet's are.
func TestNodeStatusMergesConditions(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, nil, Config{})
	name := nodeName(t, f.admin)
	hb := metav1.Now()
	report := func(ready corev1.ConditionStatus, reason, msg string, ips ...string) *corev1.Node {
		n := edgeNode(name, nil)
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: ready, Reason: reason, Message: msg, LastHeartbeatTime: hb, LastTransitionTime: hb}}
		n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: name}}
		for _, ip := range ips {
			n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
		}
		return n
	}
	require.NoError(t, f.w.Apply(ctx, name, nodeMessage(t, message.OpUpsert, name, report(corev1.ConditionTrue, "EdgeCoreReady", "ready", "192.0.2.1", "192.0.2.2"))))
	// CloudCore's condition, written as cloudcore/autonomy writes it.
	patch := []byte(`{"status":{"conditions":[{"type":"` + string(autonomy.ConditionType) + `","status":"True","reason":"` + autonomy.ReasonConnected + `"}]}}`)
	_, err := f.admin.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status")
	require.NoError(t, err)

	require.NoError(t, f.w.Apply(ctx, name, nodeMessage(t, message.OpStatus, name, report(corev1.ConditionFalse, "ContainerRuntimeUnreachable", "", "192.0.2.3"))))
	got := getNode(t, f.admin, name)
	tc := nodeCondition(got, autonomy.ConditionType)
	require.NotNil(t, tc, "the edge's status report keeps CloudCore's condition: %+v", got.Status.Conditions)
	require.Equal(t, corev1.ConditionTrue, tc.Status)
	ready := nodeCondition(got, corev1.NodeReady)
	require.NotNil(t, ready)
	require.Equal(t, corev1.ConditionFalse, ready.Status)
	require.Equal(t, "ContainerRuntimeUnreachable", ready.Reason)
	require.Empty(t, ready.Message, "a message the edge no longer reports is cleared")
	require.Equal(t, []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: name}, {Type: corev1.NodeInternalIP, Address: "192.0.2.3"}}, got.Status.Addresses,
		"addresses are replaced, not merged by type")

	before := f.refused(t, reasonField)
	forged := report(corev1.ConditionTrue, "EdgeCoreReady", "ready")
	forged.Status.Conditions = append(forged.Status.Conditions, corev1.NodeCondition{Type: autonomy.ConditionType, Status: corev1.ConditionFalse, Reason: autonomy.ReasonDisconnected})
	err = f.w.Apply(ctx, name, nodeMessage(t, message.OpStatus, name, forged))
	requireRefused(t, f, err, dispatch.ErrForbidden, reasonField, before)
	require.ErrorContains(t, err, string(autonomy.ConditionType))
	require.Equal(t, corev1.ConditionTrue, nodeCondition(getNode(t, f.admin, name), autonomy.ConditionType).Status, "nothing of a refused report is written")
}

func nodeCondition(n *corev1.Node, typ corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// A session start settles the Node from the catalog's cache alone: an
// unregistered Node costs no request (the edge registers it), a
// registered one that the operator relabelled is one update and no read,
// and one already settled costs nothing.
func TestSettleReadsTheCacheOnly(t *testing.T) {
	env := cp.Env(t)
	admin := adminClient(t, env.Config)
	ctx := context.Background()
	cat := startCatalog(t, admin)
	site := "new-site"
	f := newFixture(t, cat, Config{Labels: func(string) map[string]string { return map[string]string{"site": site} }})

	absent := nodeName(t, admin)
	require.NoError(t, f.w.Settle(ctx, absent))
	require.Empty(t, f.reqs.take(), "an unregistered Node: nothing to settle, no request")
	require.Nil(t, getNode(t, admin, absent))

	name := nodeName(t, admin)
	_, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: name, Labels: map[string]string{catalog.DefaultEdgeLabel: "", "site": "old-site"},
	}}, metav1.CreateOptions{})
	require.NoError(t, err)
	require.Eventually(t, func() bool { _, ok := cat.Node(name); return ok }, waitFor, tick)
	require.NoError(t, f.w.Settle(ctx, name))
	require.Equal(t, []string{"PUT /api/v1/nodes/" + name}, f.reqs.take(), "relabelled: one update, no read")
	require.Equal(t, "new-site", getNode(t, admin, name).Labels["site"])

	require.Eventually(t, func() bool { n, ok := cat.Node(name); return ok && n.Labels["site"] == "new-site" }, waitFor, tick)
	require.NoError(t, f.w.Settle(ctx, name))
	require.Empty(t, f.reqs.take(), "settled already: no request")
}
