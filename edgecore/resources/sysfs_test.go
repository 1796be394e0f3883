package resources

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// synth is a SYNTHETIC sysfs tree built in t.TempDir(): this machine has
// no SR-IOV NIC and no VFIO, so the SR-IOV tests run against files laid
// out as the kernel lays them out (Documentation/ABI/testing/
// sysfs-bus-pci), not against a kernel:
//
//	devices/system/cpu/online
//	kernel/mm/hugepages/hugepages-<kB>kB/nr_hugepages
//	devices/pci0000:3b/<addr>/             a device's real directory
//	bus/pci/devices/<addr>                 -> ../../../devices/pci0000:3b/<addr>
//	  PF: sriov_totalvfs, sriov_numvfs, virtfn<N> -> ../<VF>
//	  VF: physfn -> ../<PF>, driver -> ../../../bus/pci/drivers/<name>, driver_override
//	bus/pci/drivers/<name>/{bind,unbind}
//	bus/pci/drivers_probe
//
// What the kernel would do and this tree does not: a write to a driver's
// unbind removes the device's driver link; a write to drivers_probe binds
// the device to its driver_override's driver (the link moves to
// vfio-pci); a newline written to driver_override makes it read
// "(null)"; sriov_numvfs creates and removes VFs. Here every attribute is
// a plain file holding the last value written, which the tests read to
// check each write; where a test needs the kernel's effect it moves the
// driver link itself (setDriver) and says so.
type synth struct {
	t    testing.TB
	root string
}

func newSynth(t testing.TB, cpus string) *synth {
	t.Helper()
	s := &synth{t: t, root: t.TempDir()}
	s.file("devices/system/cpu/online", cpus+"\n")
	s.file("bus/pci/drivers_probe", "")
	for _, d := range []string{"vfio-pci", "iavf"} {
		s.driver(d)
	}
	return s
}

func (s *synth) file(rel, content string) {
	s.t.Helper()
	p := filepath.Join(s.root, rel)
	require.NoError(s.t, os.MkdirAll(filepath.Dir(p), 0o755))
	require.NoError(s.t, os.WriteFile(p, []byte(content), 0o644))
}

func (s *synth) link(rel, target string) {
	s.t.Helper()
	p := filepath.Join(s.root, rel)
	require.NoError(s.t, os.MkdirAll(filepath.Dir(p), 0o755))
	_ = os.Remove(p)
	require.NoError(s.t, os.Symlink(target, p))
}

// driver adds a driver directory with its bind and unbind attributes.
func (s *synth) driver(name string) {
	s.file("bus/pci/drivers/"+name+"/bind", "")
	s.file("bus/pci/drivers/"+name+"/unbind", "")
}

// hugepages sets nr_hugepages of a page size.
func (s *synth) hugepages(size, nr int64) {
	s.file(fmt.Sprintf("kernel/mm/hugepages/hugepages-%dkB/nr_hugepages", size/1024), fmt.Sprintf("%d\n", nr))
}

// device adds a PCI device's directory and its bus/pci/devices link.
func (s *synth) device(addr string) {
	s.t.Helper()
	require.NoError(s.t, os.MkdirAll(filepath.Join(s.root, "devices/pci0000:3b", addr), 0o755))
	s.link("bus/pci/devices/"+addr, "../../../devices/pci0000:3b/"+addr)
}

// pf adds a PF with VFs (numvfs of them) bound to driver ("" none).
func (s *synth) pf(pf string, total int, driver string, vfs ...string) {
	s.device(pf)
	dev := "devices/pci0000:3b/" + pf + "/"
	s.file(dev+"sriov_totalvfs", fmt.Sprintf("%d\n", total))
	s.file(dev+"sriov_numvfs", fmt.Sprintf("%d\n", len(vfs)))
	for i, vf := range vfs {
		s.device(vf)
		s.link(fmt.Sprintf("%svirtfn%d", dev, i), "../"+vf)
		vdev := "devices/pci0000:3b/" + vf + "/"
		s.link(vdev+"physfn", "../"+pf)
		s.file(vdev+"driver_override", "(null)\n")
		s.setDriver(vf, driver)
	}
}

// setDriver points a device's driver link at a driver, as the kernel
// does when it binds one ("" unbinds).
func (s *synth) setDriver(addr, driver string) {
	s.t.Helper()
	rel := "devices/pci0000:3b/" + addr + "/driver"
	_ = os.Remove(filepath.Join(s.root, rel))
	if driver != "" {
		s.link(rel, "../../../bus/pci/drivers/"+driver)
	}
}

// read returns an attribute's content, trimmed.
func (s *synth) read(rel string) string {
	s.t.Helper()
	b, err := os.ReadFile(filepath.Join(s.root, rel))
	require.NoError(s.t, err)
	return strings.TrimSpace(string(b))
}

// override is a VF's driver_override file as last written.
func (s *synth) override(addr string) string {
	return s.read("bus/pci/devices/" + addr + "/driver_override")
}

// breakFile replaces an attribute with a directory, so that writing it
// fails (root ignores file modes, so a read-only file would not).
func (s *synth) breakFile(rel string) {
	s.t.Helper()
	p := filepath.Join(s.root, rel)
	require.NoError(s.t, os.Remove(p))
	require.NoError(s.t, os.Mkdir(p, 0o755))
}
