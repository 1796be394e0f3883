package vm_test

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/vmguest"
)

// diskInfo is qemu-img's view of a VM's disk.
func diskInfo(t *testing.T, path string) map[string]any {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "--output=json", path).CombinedOutput()
	require.NoError(t, err, "%s", out)
	var m map[string]any
	require.NoError(t, json.Unmarshal(out, &m))
	return m
}

// The backend fills each image's overlay pool when it starts; a VM of the
// base's size takes its disk from the pool (no qemu-img on the create
// path: counted as a hit), a VM of another size gets its disk from
// qemu-img, and the VM's start tops the pool up again.
func TestCreateTakesPooledOverlay(t *testing.T) {
	e := newEnv(t)
	reg := promtest.NewRegistry()
	e.cfg.Registerer = reg
	b := e.backend()
	img, err := e.images.Get(vmguest.ImageName)
	require.NoError(t, err)
	pooled := func() int {
		n, err := e.images.PooledOverlays(img)
		require.NoError(t, err)
		return n
	}
	require.Eventually(t, func() bool { return pooled() == vm.DefaultOverlayPool }, time.Minute, 20*time.Millisecond,
		"the pool is filled when the backend starts")
	hits := func() float64 {
		return promtest.Sum(t, reg, "tether_vm_overlay_pool_total", map[string]string{"result": "hit"})
	}
	ctx := quiet(t.Context())

	sbCfg := e.sandbox("pooled", nil)
	sb, err := b.RunPodSandbox(ctx, sbCfg, "tether-vm")
	require.NoError(t, err)
	id, err := b.CreateContainer(ctx, sb, compute("compute"), sbCfg)
	require.NoError(t, err)
	require.Equal(t, 1.0, hits())
	require.Equal(t, vm.DefaultOverlayPool-1, pooled())
	info := diskInfo(t, filepath.Join(e.cfg.RunDir, sb, "disk.qcow2"))
	require.Equal(t, img.Path, info["backing-filename"])
	require.EqualValues(t, img.VirtualSize, info["virtual-size"])

	bigCfg := e.sandbox("bigger", map[string]string{vm.AnnotationDiskSize: "128Mi"})
	big, err := b.RunPodSandbox(ctx, bigCfg, "tether-vm")
	require.NoError(t, err)
	_, err = b.CreateContainer(ctx, big, compute("compute"), bigCfg)
	require.NoError(t, err)
	require.Equal(t, 1.0, hits(), "another size is not the pool's")
	require.Equal(t, vm.DefaultOverlayPool-1, pooled())
	info = diskInfo(t, filepath.Join(e.cfg.RunDir, big, "disk.qcow2"))
	require.Equal(t, img.Path, info["backing-filename"])
	require.EqualValues(t, 128<<20, info["virtual-size"])

	require.NoError(t, b.StartContainer(ctx, id))
	require.Eventually(t, func() bool { return pooled() == vm.DefaultOverlayPool }, time.Minute, 20*time.Millisecond,
		"a start tops the pool up")
	for _, s := range []string{sb, big} {
		require.NoError(t, b.StopPodSandbox(ctx, s))
		require.NoError(t, b.RemovePodSandbox(ctx, s))
	}
}
