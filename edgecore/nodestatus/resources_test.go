package nodestatus

import (
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tetheredge/tether/edgecore/hostinfo"
)

// list builds a ResourceList from name/quantity pairs.
func list(kv ...string) corev1.ResourceList {
	l := corev1.ResourceList{}
	for i := 0; i < len(kv); i += 2 {
		l[corev1.ResourceName(kv[i])] = resource.MustParse(kv[i+1])
	}
	return l
}

// requireSameResources compares quantities by value, whatever their format.
func requireSameResources(t *testing.T, want, got corev1.ResourceList) {
	t.Helper()
	require.Len(t, got, len(want), "got %v", got)
	for name, w := range want {
		g, ok := got[name]
		require.True(t, ok, "missing %s in %v", name, got)
		require.Zero(t, w.Cmp(g), "%s: want %s, got %s", name, w.String(), g.String())
	}
}

func TestCapacityAndAllocatable(t *testing.T) {
	host := hostResources{
		facts: hostinfo.Facts{CPUs: 4, MemoryBytes: 8 << 30, HugePages: map[int64]int64{2 << 20: 1 << 30, 1 << 30: 0}},
		// 100 GiB
		storageBytes: 100 << 30, maxPods: 110,
	}
	capacity := host.capacity()
	requireSameResources(t, list("cpu", "4", "memory", "8Gi", "ephemeral-storage", "100Gi", "pods", "110", "hugepages-2Mi", "1Gi", "hugepages-1Gi", "0"), capacity)

	defaults, err := parseEviction(nil)
	require.NoError(t, err)
	none, err := parseEviction(map[string]string{})
	require.NoError(t, err)
	for _, tc := range []struct {
		name     string
		reserved corev1.ResourceList
		eviction map[corev1.ResourceName]threshold
		want     corev1.ResourceList
	}{
		{
			name: "kubelet defaults, nothing reserved", eviction: defaults,
			// memory: 8Gi - 100Mi - 1Gi of huge pages; storage: 90 % of 100Gi.
			want: list("cpu", "4", "memory", "7068Mi", "ephemeral-storage", "92160Mi", "pods", "110", "hugepages-2Mi", "1Gi", "hugepages-1Gi", "0"),
		},
		{
			name: "reservations and defaults", eviction: defaults,
			reserved: list("cpu", "500m", "memory", "1Gi", "ephemeral-storage", "10Gi"),
			want:     list("cpu", "3500m", "memory", "6044Mi", "ephemeral-storage", "81920Mi", "pods", "110", "hugepages-2Mi", "1Gi", "hugepages-1Gi", "0"),
		},
		{
			name: "no eviction thresholds", eviction: none,
			want: list("cpu", "4", "memory", "7Gi", "ephemeral-storage", "100Gi", "pods", "110", "hugepages-2Mi", "1Gi", "hugepages-1Gi", "0"),
		},
		{
			name: "reserved beyond capacity is zero, never negative", eviction: none,
			reserved: list("cpu", "8", "memory", "9Gi"),
			want:     list("cpu", "0", "memory", "0", "ephemeral-storage", "100Gi", "pods", "110", "hugepages-2Mi", "1Gi", "hugepages-1Gi", "0"),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requireSameResources(t, tc.want, allocatable(capacity, tc.reserved, tc.eviction))
		})
	}
}

func TestParseEviction(t *testing.T) {
	got, err := parseEviction(map[string]string{"memory.available": "200Mi", "nodefs.available": "5%"})
	require.NoError(t, err)
	require.Equal(t, map[corev1.ResourceName]threshold{
		corev1.ResourceMemory:           {quantity: resource.MustParse("200Mi")},
		corev1.ResourceEphemeralStorage: {percent: 5},
	}, got)
	for _, bad := range []map[string]string{
		{"imagefs.available": "15%"},
		{"memory.available": "lots"},
		{"memory.available": "-1Mi"},
		{"nodefs.available": "101%"},
		{"nodefs.available": "x%"},
	} {
		_, err := parseEviction(bad)
		require.Error(t, err, "%v", bad)
	}
}

func TestSumReserved(t *testing.T) {
	got, err := sumReserved(list("cpu", "100m", "memory", "1Gi"), list("cpu", "200m"), nil)
	require.NoError(t, err)
	requireSameResources(t, list("cpu", "300m", "memory", "1Gi"), got)
	_, err = sumReserved(list("pods", "10"))
	require.ErrorContains(t, err, "only cpu, memory and ephemeral-storage")
	_, err = sumReserved(list("cpu", "-1"))
	require.ErrorContains(t, err, "negative")
}

// resourceFraction is pct % of q, rounded down as threshold.of does.
func resourceFraction(q resource.Quantity, pct float64) *resource.Quantity {
	t := threshold{percent: pct}.of(q)
	return &t
}

// The pool's reserved cores come off allocatable cpu in whole cores
// (system cores supersede SystemReserved's cpu, as kubelet's
// --reserved-cpus; data-plane cores add to it); VF pools are extended
// resources with allocatable = capacity; labels (the VM backend's
// acceleration) are on the Node.
func TestReservedCoresAndExtendedResources(t *testing.T) {
	host := syntheticHost(t) // 6 CPUs
	for _, tc := range []struct {
		name  string
		cores ReservedCores
		want  string
	}{
		{"system cores supersede the quantity", ReservedCores{System: 1, DataPlane: 2}, "3"},
		{"data-plane cores add to the quantity", ReservedCores{DataPlane: 2}, "3500m"},
		{"none: the quantity alone", ReservedCores{}, "5500m"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := New(Config{
				Node: "edge-1", HostRoot: host, SystemReserved: list("cpu", "500m"), ReservedCores: tc.cores,
				ExtendedResources: map[corev1.ResourceName]int64{"sriov.edge.tether.dev/a": 3},
				Labels:            map[string]string{"vm.edge.tether.dev/acceleration": "tcg"},
			}, nil, nil)
			require.NoError(t, err)
			n := r.Node()
			c, got := n.Status.Capacity[corev1.ResourceCPU], n.Status.Allocatable[corev1.ResourceCPU]
			require.Equal(t, int64(6), c.Value())
			want := resource.MustParse(tc.want)
			require.Zero(t, want.Cmp(got), "allocatable cpu %s", got.String())
			for _, l := range []corev1.ResourceList{n.Status.Capacity, n.Status.Allocatable} {
				q := l["sriov.edge.tether.dev/a"]
				require.Equal(t, int64(3), q.Value())
			}
			require.Equal(t, "tcg", n.Labels["vm.edge.tether.dev/acceleration"])
		})
	}
	for _, bad := range []Config{
		{Node: "a", HostRoot: host, ReservedCores: ReservedCores{System: -1}},
		{Node: "a", HostRoot: host, ExtendedResources: map[corev1.ResourceName]int64{"vfs": 1}},
		{Node: "a", HostRoot: host, ExtendedResources: map[corev1.ResourceName]int64{"example.com/x": -1}},
	} {
		_, err := New(bad, nil, nil)
		require.ErrorContains(t, err, "nodestatus config:")
	}
}
