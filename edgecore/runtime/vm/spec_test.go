package vm

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qemu"
)

// What a pool's grant becomes in QEMU's spec: pinned vCPUs, the shared
// set for the emulator threads, the hugetlbfs mount, the VFs by PCI
// address; and a direct kernel boot gets a serial console by default.
func TestSpecFromGrant(t *testing.T) {
	b := &Backend{cfg: Config{Accel: qemu.AccelTCG}}
	rec := &record{
		ID: "0123456789abcdef0123456789abcdef", Dir: "/run/tether/vm/x",
		Params: params{VCPUs: 2, MemoryBytes: 1 << 30, HugepageSize: resources.Hugepage2Mi, DedicatedCPUs: true},
		Grant: &resources.Grant{CPUs: []int{2, 3}, SharedCPUs: []int{0, 1}, HugepageDir: "/dev/hugepages",
			VFs: []resources.VF{{Pool: "a", Address: "0000:3b:02.1"}, {Pool: "b", Address: "0000:3b:02.2"}}},
	}
	c := &container{ID: "c1", LogPath: "/var/log/pods/x/compute_0.log"}
	img := Image{Name: "g", Kernel: "/img/g/kernel", Initrd: "/img/g/initrd"}
	s := b.spec(rec, c, img, "/run/tether/vm/x/disk.qcow2")
	require.Equal(t, qemu.Spec{
		Name: "tether-0123456789ab", Dir: rec.Dir, VCPUs: 2, MemoryBytes: 1 << 30, HugepageDir: "/dev/hugepages",
		Disk: "/run/tether/vm/x/disk.qcow2", Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: "console=ttyS0",
		SerialLog: "/run/tether/vm/x/console-c1.raw", VFIO: []string{"0000:3b:02.1", "0000:3b:02.2"}, Accel: "tcg",
		DedicatedCPUs: []int{2, 3}, SharedCPUs: []int{0, 1},
	}, s)
	require.NoError(t, s.Validate())

	// Without a pool: the backend's own hugetlbfs mount, nothing pinned.
	rec.Grant, rec.HugepageDir = nil, "/mnt/huge"
	s = b.spec(rec, c, Image{Name: "g"}, "/d.qcow2")
	require.Equal(t, "/mnt/huge", s.HugepageDir)
	require.Empty(t, s.DedicatedCPUs)
	require.Empty(t, s.Cmdline, "booting from the disk: no kernel command line")
}
