package resources

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// SR-IOV through sysfs, as the kernel documents it
// (Documentation/ABI/testing/sysfs-bus-pci, PCI/pci-iov-howto):
//
//	bus/pci/devices/<PF>/sriov_totalvfs   VFs the PF can have
//	bus/pci/devices/<PF>/sriov_numvfs     VFs it has now
//	bus/pci/devices/<PF>/virtfn<N>        -> ../<VF address>, N < numvfs
//	bus/pci/devices/<VF>/driver           -> .../drivers/<name>, absent when unbound
//	bus/pci/devices/<VF>/driver_override  "(null)" or the one driver allowed
//	bus/pci/drivers/<name>/unbind         write an address: release it
//	bus/pci/drivers_probe                 write an address: bind it to its
//	                                      driver (driver_override, if set)
//
// Binding a VF to vfio-pci: write "vfio-pci" to its driver_override,
// its address to its current driver's unbind, its address to
// drivers_probe. Releasing it: its address to vfio-pci's unbind, a
// newline to driver_override (clears it), its address to drivers_probe
// (its default driver, the one recorded before, takes it back). Every
// write is checked; sysfs reports a refused write as the write's error.
// The files are opened write-only and never created: a missing attribute
// is an error, not a new file.

// vfioDriver is the driver QEMU's -device vfio-pci needs.
const vfioDriver = "vfio-pci"

// sysfs is the PCI part of a sysfs tree.
type sysfs string

func (s sysfs) device(addr string, attr ...string) string {
	return filepath.Join(append([]string{string(s), "bus/pci/devices", addr}, attr...)...)
}

func (s sysfs) driverFile(driver, attr string) string {
	return filepath.Join(string(s), "bus/pci/drivers", driver, attr)
}

// vfsOf returns the addresses of a PF's VFs, virtfn0 first.
func (s sysfs) vfsOf(pf string) ([]string, error) {
	n, err := readInt(s.device(pf, "sriov_numvfs"))
	if err != nil {
		return nil, fmt.Errorf("read VFs of %s: %w", pf, err)
	}
	out := make([]string, 0, n)
	for i := range n {
		link, err := os.Readlink(s.device(pf, fmt.Sprintf("virtfn%d", i)))
		if err != nil {
			return nil, fmt.Errorf("read VF %d of %s: %w", i, pf, err)
		}
		addr := filepath.Base(link)
		if !pciAddress.MatchString(addr) {
			return nil, fmt.Errorf("read VF %d of %s: link %q names no PCI address", i, pf, link)
		}
		out = append(out, addr)
	}
	return out, nil
}

// driver is the driver a device is bound to; "" when none.
func (s sysfs) driver(addr string) (string, error) {
	link, err := os.Readlink(s.device(addr, "driver"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read driver of %s: %w", addr, err)
	}
	return filepath.Base(link), nil
}

// override is a device's driver_override; "" when unset ("(null)").
func (s sysfs) override(addr string) (string, error) {
	b, err := os.ReadFile(s.device(addr, "driver_override"))
	if err != nil {
		return "", fmt.Errorf("read driver_override of %s: %w", addr, err)
	}
	v := strings.TrimSpace(string(b))
	if v == "(null)" {
		v = ""
	}
	return v, nil
}

// write writes one value to an existing sysfs attribute.
func (s sysfs) write(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	return errors.Join(err, f.Close())
}

// free reports whether a VF may be handed out: bound to no driver or to
// an ordinary one, and not steered elsewhere by a driver_override. A VF
// on vfio-pci that the pool does not record is someone else's (another
// VMM, a DPDK application).
func (s sysfs) free(addr string) (bool, error) {
	drv, err := s.driver(addr)
	if err != nil {
		return false, err
	}
	ov, err := s.override(addr)
	if err != nil {
		return false, err
	}
	return drv != vfioDriver && ov == "", nil
}

// bindVFIO binds a VF to vfio-pci. A VF already there, with the override
// set, is left alone (a repeated Allocate after a crash). On failure it
// undoes what it wrote and returns the first error.
func (s sysfs) bindVFIO(addr string) error {
	drv, err := s.driver(addr)
	if err != nil {
		return err
	}
	ov, err := s.override(addr)
	if err != nil {
		return err
	}
	if drv == vfioDriver && ov == vfioDriver {
		return nil
	}
	if err := s.write(s.device(addr, "driver_override"), vfioDriver); err != nil {
		return fmt.Errorf("bind %s to %s: set driver_override: %w", addr, vfioDriver, err)
	}
	fail := func(step string, err error) error {
		return errors.Join(fmt.Errorf("bind %s to %s: %s: %w", addr, vfioDriver, step, err), s.clearOverride(addr))
	}
	if drv != "" && drv != vfioDriver {
		if err := s.write(s.driverFile(drv, "unbind"), addr); err != nil {
			return fail("unbind from "+drv, err)
		}
	}
	if err := s.write(filepath.Join(string(s), "bus/pci/drivers_probe"), addr); err != nil {
		return fail("probe", err)
	}
	if ov, err := s.override(addr); err != nil || ov != vfioDriver {
		return fail("check driver_override", errors.Join(err, fmt.Errorf("reads %q", ov)))
	}
	return nil
}

// clearOverride clears a VF's driver_override and re-probes it, so its
// default driver takes it back.
func (s sysfs) clearOverride(addr string) error {
	if err := s.write(s.device(addr, "driver_override"), "\n"); err != nil {
		return fmt.Errorf("restore %s: clear driver_override: %w", addr, err)
	}
	if err := s.write(filepath.Join(string(s), "bus/pci/drivers_probe"), addr); err != nil {
		return fmt.Errorf("restore %s: probe: %w", addr, err)
	}
	return nil
}

// restore gives a VF back: unbound from vfio-pci, its override cleared,
// re-probed. A VF that no longer exists (its PF's sriov_numvfs was
// lowered) is restored by definition.
func (s sysfs) restore(addr string) error {
	if _, err := os.Lstat(s.device(addr)); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	drv, err := s.driver(addr)
	if err != nil {
		return err
	}
	if drv == vfioDriver {
		if err := s.write(s.driverFile(vfioDriver, "unbind"), addr); err != nil {
			return fmt.Errorf("restore %s: unbind from %s: %w", addr, vfioDriver, err)
		}
	}
	return s.clearOverride(addr)
}
