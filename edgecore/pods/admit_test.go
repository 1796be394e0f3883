package pods

import (
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/types"
)

func rl(kv ...string) corev1.ResourceList {
	out := corev1.ResourceList{}
	for i := 0; i < len(kv); i += 2 {
		out[corev1.ResourceName(kv[i])] = resource.MustParse(kv[i+1])
	}
	return out
}

func TestEffectiveRequests(t *testing.T) {
	ctr := func(req, lim corev1.ResourceList) corev1.Container {
		return corev1.Container{Resources: corev1.ResourceRequirements{Requests: req, Limits: lim}}
	}
	for _, tc := range []struct {
		name string
		spec corev1.PodSpec
		want corev1.ResourceList
	}{
		{"none", corev1.PodSpec{Containers: []corev1.Container{{}}}, rl()},
		{"sum of app containers", corev1.PodSpec{Containers: []corev1.Container{
			ctr(rl("cpu", "100m", "memory", "64Mi"), nil), ctr(rl("cpu", "200m"), nil),
		}}, rl("cpu", "300m", "memory", "64Mi")},
		{"limit without request counts", corev1.PodSpec{Containers: []corev1.Container{
			ctr(nil, rl("cpu", "500m")), ctr(rl("cpu", "100m"), rl("cpu", "1")),
		}}, rl("cpu", "600m")},
		{"init larger than the app sum", corev1.PodSpec{
			InitContainers: []corev1.Container{ctr(rl("cpu", "1"), nil), ctr(rl("cpu", "2", "memory", "1Mi"), nil)},
			Containers:     []corev1.Container{ctr(rl("cpu", "500m", "memory", "64Mi"), nil), ctr(rl("cpu", "500m"), nil)},
		}, rl("cpu", "2", "memory", "64Mi")},
		{"init smaller than the app sum", corev1.PodSpec{
			InitContainers: []corev1.Container{ctr(rl("cpu", "300m"), nil)},
			Containers:     []corev1.Container{ctr(rl("cpu", "200m"), nil), ctr(rl("cpu", "200m"), nil)},
		}, rl("cpu", "400m")},
		{"overhead added", corev1.PodSpec{
			Overhead:   rl("cpu", "50m", "memory", "10Mi"),
			Containers: []corev1.Container{ctr(rl("cpu", "100m"), nil)},
		}, rl("cpu", "150m", "memory", "10Mi")},
		{"hugepages", corev1.PodSpec{Containers: []corev1.Container{
			ctr(rl("hugepages-2Mi", "4Mi"), rl("hugepages-2Mi", "4Mi")),
		}}, rl("hugepages-2Mi", "4Mi")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := effectiveRequests(&corev1.Pod{Spec: tc.spec})
			require.Len(t, got, len(tc.want), "%v", got)
			for name, q := range tc.want {
				g := got[name]
				require.Zerof(t, q.Cmp(g), "%s: got %s, want %s", name, g.String(), q.String())
			}
		})
	}
}

func TestFits(t *testing.T) {
	node := rl("cpu", "1", "memory", "1Gi", "pods", "3")
	for _, tc := range []struct {
		name        string
		req, used   corev1.ResourceList
		count       int
		allocatable corev1.ResourceList
		want        rejection
	}{
		{name: "no allocatable admits all", req: rl("cpu", "100"), allocatable: nil},
		{name: "fits", req: rl("cpu", "400m"), used: rl("cpu", "600m"), count: 1, allocatable: node},
		{name: "exactly full fits", req: rl("cpu", "1"), allocatable: node},
		{name: "out of cpu", req: rl("cpu", "600m"), used: rl("cpu", "600m"), count: 1, allocatable: node,
			want: rejection{Reason: "OutOfcpu", Message: "Pod was rejected: Node didn't have enough resource: cpu, requested: 600, used: 600, capacity: 1000"}},
		{name: "out of memory", req: rl("memory", "1Gi"), used: rl("memory", "1Mi"), count: 1, allocatable: node,
			want: rejection{Reason: "OutOfmemory", Message: "Pod was rejected: Node didn't have enough resource: memory, requested: 1073741824, used: 1048576, capacity: 1073741824"}},
		{name: "cpu reported before memory", req: rl("memory", "2Gi", "cpu", "2"), allocatable: node,
			want: rejection{Reason: "OutOfcpu", Message: "Pod was rejected: Node didn't have enough resource: cpu, requested: 2000, used: 0, capacity: 1000"}},
		{name: "out of pods, even without requests", req: rl(), count: 3, allocatable: node,
			want: rejection{Reason: "OutOfpods", Message: "Pod was rejected: Node didn't have enough resource: pods, requested: 1, used: 3, capacity: 3"}},
		{name: "hugepages the node lacks", req: rl("hugepages-2Mi", "4Mi"), allocatable: node,
			want: rejection{Reason: "OutOfhugepages-2Mi", Message: "Pod was rejected: Node didn't have enough resource: hugepages-2Mi, requested: 4194304, used: 0, capacity: 0"}},
		{name: "hugepages that fit", req: rl("hugepages-1Gi", "1Gi"), allocatable: rl("hugepages-1Gi", "2Gi")},
		{name: "out of hugepages-1Gi", req: rl("hugepages-1Gi", "1Gi"), used: rl("hugepages-1Gi", "2Gi"), count: 1, allocatable: rl("hugepages-1Gi", "2Gi"),
			want: rejection{Reason: "OutOfhugepages-1Gi", Message: "Pod was rejected: Node didn't have enough resource: hugepages-1Gi, requested: 1073741824, used: 2147483648, capacity: 2147483648"}},
		{name: "unnamed resource not checked", req: rl("ephemeral-storage", "100Gi", "example.com/gpu", "1"), allocatable: node},
		{name: "named extended resource checked", req: rl("example.com/gpu", "2"), allocatable: rl("example.com/gpu", "1"),
			want: rejection{Reason: "OutOfexample.com/gpu", Message: "Pod was rejected: Node didn't have enough resource: example.com/gpu, requested: 2, used: 0, capacity: 1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := fits(tc.req, tc.used, tc.count, tc.allocatable)
			require.Equal(t, tc.want, got)
			require.Equal(t, tc.want.Reason == "", ok)
		})
	}
}

// The decisions: once per UID, a pod with a sandbox is admitted whatever
// it asks, finished pods free their share, a rejected pod stays rejected
// after room is made, and a stored terminal pod is not started again.
func TestAdmitDecisions(t *testing.T) {
	m := &Manager{cfg: Config{Allocatable: rl("cpu", "1", "pods", "10")}, admission: newAdmission()}
	pod := func(uid, cpu string) *corev1.Pod {
		p := &corev1.Pod{}
		p.UID = types.UID("uid-" + uid)
		p.Spec.Containers = []corev1.Container{{Resources: corev1.ResourceRequirements{Requests: rl("cpu", cpu)}}}
		return p
	}
	a, b, c := pod("a", "600m"), pod("b", "600m"), pod("c", "2")
	_, ok := m.admit(a, false)
	require.True(t, ok)
	r, ok := m.admit(b, false)
	require.False(t, ok)
	require.Equal(t, "OutOfcpu", r.Reason)
	_, ok = m.admit(c, true) // already runs: adopted, not checked
	require.True(t, ok)
	_, ok = m.admit(a, false) // decided once: still admitted although c now overcommits
	require.True(t, ok)

	m.finish(string(a.UID), false)
	m.finish(string(c.UID), true)
	_, ok = m.admit(b, false)
	require.False(t, ok, "a rejection is kept")
	_, ok = m.admit(a, false)
	require.True(t, ok, "a finished pod stays admitted")
	d := pod("d", "1")
	_, ok = m.admit(d, false)
	require.True(t, ok, "finished and gone pods reserve nothing")

	done := pod("e", "1m")
	done.Status.Phase = corev1.PodFailed
	r, ok = m.admit(done, false)
	require.False(t, ok)
	require.True(t, r.stored)
}
