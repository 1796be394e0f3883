package vm_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
)

// vfSysfs is a SYNTHETIC sysfs tree (this machine has no SR-IOV NIC and
// no VFIO): two CPUs, one PF 0000:3b:00.0 with one VF 0000:3b:02.0 bound
// to iavf, laid out as the kernel lays them out, every attribute a plain
// file that keeps the last value written.
func vfSysfs(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	file := func(rel, content string) {
		p := filepath.Join(root, rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(content), 0o644))
	}
	link := func(rel, target string) {
		p := filepath.Join(root, rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.Symlink(target, p))
	}
	file("devices/system/cpu/online", "0-1\n")
	file("bus/pci/drivers_probe", "")
	for _, d := range []string{"iavf", "vfio-pci"} {
		file("bus/pci/drivers/"+d+"/bind", "")
		file("bus/pci/drivers/"+d+"/unbind", "")
	}
	file("bus/pci/devices/0000:3b:00.0/sriov_totalvfs", "8\n")
	file("bus/pci/devices/0000:3b:00.0/sriov_numvfs", "1\n")
	link("bus/pci/devices/0000:3b:00.0/virtfn0", "../0000:3b:02.0")
	file("bus/pci/devices/0000:3b:02.0/driver_override", "(null)\n")
	link("bus/pci/devices/0000:3b:02.0/driver", "../../drivers/iavf")
	return root
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

// SR-IOV through the backend and the real resource pool, on a synthetic
// sysfs: two VMs race for the node's last VF; one gets it, bound to
// vfio-pci (driver_override, unbind from iavf, drivers_probe), and its
// QEMU spec passes it through; the other is ResourceExhausted and leaves
// nothing. QEMU itself cannot start with the VF here (no VFIO): StartContainer
// fails and says so. Stopping the sandbox gives the VF back (override
// cleared, re-probed), so the loser can have it now; removing leaves no
// rows. Not run: a real VF, a real vfio-pci bind, a guest using the VF.
func TestVFsThroughPool(t *testing.T) {
	sys := vfSysfs(t)
	e := newEnv(t)
	pool, err := resources.New(resources.Config{SysfsRoot: sys, HugepageMounts: map[int64]string{},
		VFPools: map[string][]string{"a": {"0000:3b:00.0"}}}, e.st.Allocations(), nil)
	require.NoError(t, err)
	e.cfg.Pool = pool
	b := e.backend()
	ctx := t.Context()
	const vf = "0000:3b:02.0"
	dev := func(attr string) string { return filepath.Join(sys, "bus/pci/devices", vf, attr) }

	var wg sync.WaitGroup
	ids, errs := make([]string, 2), make([]error, 2)
	for i, name := range []string{"vf-1", "vf-2"} {
		wg.Go(func() {
			ids[i], errs[i] = b.RunPodSandbox(ctx, e.sandbox(name, map[string]string{vm.AnnotationSRIOV: "a=1"}), "tether-vm")
		})
	}
	wg.Wait()
	win, lose := 0, 1
	if errs[0] != nil {
		win, lose = 1, 0
	}
	require.NoError(t, errs[win])
	require.Equal(t, codes.ResourceExhausted, status.Code(errs[lose]), "the loser: %v", errs[lose])
	require.Contains(t, errs[lose].Error(), resources.ResourcePrefixVF+"a")
	sb := ids[win]
	sbs, err := b.ListPodSandbox(ctx, nil)
	require.NoError(t, err)
	require.Len(t, sbs, 1, "the refused VM left no sandbox")
	all, err := e.st.Allocations().Kind(ctx, "")
	require.NoError(t, err)
	for _, r := range all {
		require.Equal(t, sb, r.Owner, "a row of the loser: %+v", r)
	}

	g, ok, err := pool.Lookup(ctx, sb)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, []resources.VF{{Pool: "a", Address: vf, PreviousDriver: "iavf"}}, g.VFs)
	require.Equal(t, "vfio-pci", readFile(t, dev("driver_override")))
	require.Equal(t, vf, readFile(t, filepath.Join(sys, "bus/pci/drivers/iavf/unbind")))
	require.Equal(t, vf, readFile(t, filepath.Join(sys, "bus/pci/drivers_probe")))

	cid, err := b.CreateContainer(ctx, sb, compute("compute"), e.sandbox("vf", nil))
	require.NoError(t, err)
	rows, err := e.st.Allocations().Kind(ctx, vm.KindVM)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	var rec struct {
		Containers []struct {
			Spec struct{ VFIO []string } `json:"spec"`
		} `json:"containers"`
	}
	require.NoError(t, json.Unmarshal(rows[0].Detail, &rec))
	require.Len(t, rec.Containers, 1)
	require.Equal(t, []string{vf}, rec.Containers[0].Spec.VFIO, "the VF goes to QEMU as -device vfio-pci,host=")
	err = b.StartContainer(ctx, cid)
	require.Error(t, err, "no VFIO on this machine: QEMU cannot open the VF")
	t.Logf("StartContainer with a synthetic VF: %v", err)

	require.NoError(t, b.StopPodSandbox(ctx, sb))
	require.Equal(t, "\n", readFile(t, dev("driver_override")), "the override cleared")
	require.Equal(t, vf, readFile(t, filepath.Join(sys, "bus/pci/drivers_probe")), "re-probed for iavf")
	_, ok, err = pool.Lookup(ctx, sb)
	require.NoError(t, err)
	require.False(t, ok, "the stopped sandbox holds no VF")
	// The kernel would clear the override ("(null)") and move the driver
	// link back to iavf; the synthetic tree does not, so the test does.
	require.NoError(t, os.WriteFile(dev("driver_override"), []byte("(null)\n"), 0o644))
	again, err := b.RunPodSandbox(ctx, e.sandbox("vf-3", map[string]string{vm.AnnotationSRIOV: "a=1"}), "tether-vm")
	require.NoError(t, err, "the VF is free again")
	require.NoError(t, b.StopPodSandbox(ctx, again))
	require.NoError(t, b.RemovePodSandbox(ctx, again))
	require.NoError(t, b.RemovePodSandbox(ctx, sb))
	all, err = e.st.Allocations().Kind(ctx, "")
	require.NoError(t, err)
	require.Empty(t, all)
}
