package app_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"

	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/resources"
)

// With Config.Resources, EdgeCore builds the pool on its own store and the
// Node advertises it: allocatable cpu without the reserved cores, and the
// VF pool as an extended resource. The VF pool's sysfs is SYNTHETIC
// (files laid out as the kernel's, in t.TempDir()): this machine has no
// SR-IOV NIC.
func TestNodeAdvertisesPool(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	online, err := os.ReadFile("/sys/devices/system/cpu/online")
	require.NoError(t, err)
	sys := t.TempDir()
	files := map[string]string{
		"devices/system/cpu/online":                    string(online),
		"bus/pci/devices/0000:3b:00.0/sriov_totalvfs":  "8\n",
		"bus/pci/devices/0000:3b:00.0/sriov_numvfs":    "2\n",
		"bus/pci/devices/0000:3b:02.0/driver_override": "(null)\n",
		"bus/pci/devices/0000:3b:02.1/driver_override": "(null)\n",
		"bus/pci/drivers_probe":                        "",
	}
	for p, c := range files {
		require.NoError(t, os.MkdirAll(filepath.Join(sys, filepath.Dir(p)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(sys, p), []byte(c), 0o644))
	}
	for i, vf := range []string{"0000:3b:02.0", "0000:3b:02.1"} {
		require.NoError(t, os.Symlink("../"+vf, filepath.Join(sys, "bus/pci/devices/0000:3b:00.0", "virtfn"+string(rune('0'+i)))))
	}

	cfg := config(t)
	cfg.NodeStatus.EvictionHard = map[string]string{}
	cfg.NodeStatus.Labels = map[string]string{"site": "shop-17"}
	cfg.Resources = &resources.Config{
		SysfsRoot: sys, HugepageMounts: map[int64]string{}, ReservedSystemCPUs: "0",
		VFPools: map[string][]string{"a": {"0000:3b:00.0"}},
	}
	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close()) }()
	require.NotNil(t, a.Pool())
	g, err := a.Pool().Allocate(ctx, resources.Request{Owner: "sb1", VFs: map[string]int{"a": 1}})
	require.NoError(t, err)
	require.Equal(t, "0000:3b:02.0", g.VFs[0].Address)
	rows, err := a.Store().Allocations().Owner(ctx, "sb1")
	require.NoError(t, err)
	require.NotEmpty(t, rows, "the grant is in EdgeCore's own store")

	defer run(ctx, t, a)()
	var node corev1.Node
	require.Eventually(t, func() bool {
		items, err := a.Store().Pending(ctx, 100)
		if err != nil {
			return false
		}
		for _, it := range items {
			if it.Resource.Kind == "Node" {
				return json.Unmarshal(it.Data, &node) == nil
			}
		}
		return false
	}, 30*time.Second, 50*time.Millisecond)
	c, alloc := node.Status.Capacity[corev1.ResourceCPU], node.Status.Allocatable[corev1.ResourceCPU]
	require.Equal(t, c.Value()-1, alloc.Value(), "one reserved core: capacity %s, allocatable %s", c.String(), alloc.String())
	require.Positive(t, c.Value())
	for _, l := range []corev1.ResourceList{node.Status.Capacity, node.Status.Allocatable} {
		q := l["sriov.edge.tether.dev/a"]
		require.Equal(t, int64(2), q.Value())
	}
	require.Equal(t, "shop-17", node.Labels["site"])
	require.Equal(t, map[string]string{"site": "shop-17"}, cfg.NodeStatus.Labels, "the caller's labels are not touched")
}
