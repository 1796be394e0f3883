// Package guest builds Tether's test guest: Debian's linux-image-cloud-amd64
// kernel, booted directly, with a busybox initramfs written here (cpio.go)
// whose /init (init.sh) mounts proc, sys and devtmpfs, loads the virtio,
// ACPI button and evdev modules, runs busybox acpid so that the ACPI power
// button (QMP system_powerdown) powers the guest off (powerbutton.sh),
// counts its boots in the first bytes of /dev/vda when a disk is attached,
// and prints the boot marker on the serial console.
//
// Serial console lines (console=ttyS0) a test can wait for:
//
//	TETHER-GUEST-DISK boot=N   before the marker, when /dev/vda exists: the Nth boot on this disk
//	TETHER-GUEST-BOOTED        the boot marker
//	TETHER-GUEST-POWERDOWN     the power button was pressed; poweroff follows
//	TETHER-GUEST-ERROR ...     a module did not load
//
// The initramfs is cached under Config.CacheDir by a digest of all that
// goes into it (busybox, the modules, the scripts, a layout version), and
// written through a temporary file renamed into place, so parallel test
// binaries build it once and never read half a file. Nothing is
// downloaded: the inputs are Debian packages (make guest-deps installs
// them). The package only writes files; it never runs QEMU.
package guest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	_ "embed" // the guest's scripts
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Marker lines of the guest's serial console.
const (
	BootMarker      = "TETHER-GUEST-BOOTED"
	PowerdownMarker = "TETHER-GUEST-POWERDOWN"
	DiskMarker      = "TETHER-GUEST-DISK boot="
	ErrorMarker     = "TETHER-GUEST-ERROR"
)

// Cmdline is the kernel command line for the guest: console on the first
// serial port, kernel messages kept off it (quiet loglevel=3) so the
// markers stand on lines of their own.
const Cmdline = "console=ttyS0 quiet loglevel=3"

// layout is bumped whenever what goes into the initramfs changes in a way
// the digest does not see.
const layout = "1"

//go:embed init.sh
var initScript []byte

//go:embed powerbutton.sh
var powerScript []byte

// modules are loaded by /init, in dependency order (resolved from
// modules.dep): virtio_pci and virtio_blk for the disk, button for the
// ACPI power button, evdev for acpid to read it.
var modules = []string{"virtio_pci", "virtio_blk", "button", "evdev"}

// Config says what the guest is built from. The zero value (but CacheDir)
// works on Debian with busybox-static and linux-image-cloud-amd64.
type Config struct {
	// CacheDir keeps the built initramfs; required.
	CacheDir string
	// Busybox is a static busybox; "" means /bin/busybox.
	Busybox string
	// Kernel is the kernel image; "" means the newest
	// /boot/vmlinuz-*-cloud-amd64.
	Kernel string
	// ModulesDir holds the kernel's modules and modules.dep; "" means
	// /lib/modules/<release of Kernel>.
	ModulesDir string
}

// Paths are what QEMU boots.
type Paths struct {
	Kernel  string
	Initrd  string
	Cmdline string
}

// Build returns the guest, building the initramfs when the cache has none
// for the current inputs.
func Build(cfg Config) (Paths, error) {
	if cfg.CacheDir == "" {
		return Paths{}, errors.New("build guest: no cache dir")
	}
	if cfg.Busybox == "" {
		cfg.Busybox = "/bin/busybox"
	}
	if cfg.Kernel == "" {
		k, err := newestCloudKernel("/boot")
		if err != nil {
			return Paths{}, err
		}
		cfg.Kernel = k
	}
	if cfg.ModulesDir == "" {
		release := strings.TrimPrefix(filepath.Base(cfg.Kernel), "vmlinuz-")
		cfg.ModulesDir = filepath.Join("/lib/modules", release)
	}
	if _, err := os.Stat(cfg.Kernel); err != nil {
		return Paths{}, fmt.Errorf("find guest kernel (apt-get install linux-image-cloud-amd64): %w", err)
	}
	busybox, err := os.ReadFile(cfg.Busybox)
	if err != nil {
		return Paths{}, fmt.Errorf("read busybox (apt-get install busybox-static): %w", err)
	}
	order, err := moduleOrder(cfg.ModulesDir, modules)
	if err != nil {
		return Paths{}, err
	}
	h := sha256.New()
	add := func(b []byte) { fmt.Fprintf(h, "%d:", len(b)); h.Write(b) }
	add([]byte(layout))
	add(initScript)
	add(powerScript)
	add(busybox)
	mods := make([][]byte, len(order))
	for i, rel := range order {
		if mods[i], err = os.ReadFile(filepath.Join(cfg.ModulesDir, rel)); err != nil {
			return Paths{}, fmt.Errorf("read module: %w", err)
		}
		add([]byte(rel))
		add(mods[i])
	}
	path := filepath.Join(cfg.CacheDir, "initrd-"+hex.EncodeToString(h.Sum(nil))[:16]+".cpio.gz")
	paths := Paths{Kernel: cfg.Kernel, Initrd: path, Cmdline: Cmdline}
	if _, err := os.Stat(path); err == nil {
		return paths, nil
	}

	var w cpioWriter
	for _, d := range []string{"bin", "dev", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules", "proc", "run", "sys", "tmp"} {
		w.dir(d)
	}
	w.char("dev/console", 5, 1)
	w.file("bin/busybox", 0o755, busybox)
	w.symlink("bin/sh", "busybox")
	w.file("init", 0o755, initScript)
	w.file("etc/acpi/PWRF/00000080", 0o755, powerScript)
	names := make([]string, len(order))
	for i, rel := range order {
		names[i] = filepath.Base(rel)
		w.file("lib/modules/"+names[i], 0o644, mods[i])
	}
	w.file("etc/modules", 0o644, []byte(strings.Join(names, "\n")+"\n"))

	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	if err != nil {
		return Paths{}, fmt.Errorf("compress initramfs: %w", err)
	}
	if _, err := zw.Write(w.bytes()); err != nil {
		return Paths{}, fmt.Errorf("compress initramfs: %w", err)
	}
	if err := zw.Close(); err != nil {
		return Paths{}, fmt.Errorf("compress initramfs: %w", err)
	}
	if err := writeAtomic(path, gz.Bytes()); err != nil {
		return Paths{}, err
	}
	return paths, nil
}

// newestCloudKernel picks the highest-sorting vmlinuz-*-cloud-amd64 in dir.
func newestCloudKernel(dir string) (string, error) {
	found, err := filepath.Glob(filepath.Join(dir, "vmlinuz-*-cloud-amd64"))
	if err != nil || len(found) == 0 {
		return "", fmt.Errorf("find guest kernel: no %s/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)", dir)
	}
	sort.Strings(found)
	return found[len(found)-1], nil
}

// moduleOrder lists the modules (paths relative to dir) to load for want,
// each after the modules it depends on, from dir/modules.dep. A wanted
// module that is built into the kernel (modules.builtin) is skipped.
func moduleOrder(dir string, want []string) ([]string, error) {
	deps, err := readModulesDep(filepath.Join(dir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	builtin, _ := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	byName := make(map[string]string, len(deps))
	for rel := range deps {
		name, _, _ := strings.Cut(filepath.Base(rel), ".ko") // also .ko.xz, .ko.zst
		byName[name] = rel
	}
	var order []string
	added := map[string]bool{}
	var visit func(rel string)
	visit = func(rel string) {
		if added[rel] {
			return
		}
		added[rel] = true
		d := deps[rel]
		for i := len(d) - 1; i >= 0; i-- { // modules.dep lists the deepest dependency last
			visit(d[i])
		}
		order = append(order, rel)
	}
	for _, name := range want {
		rel, ok := byName[name]
		if !ok {
			if bytes.Contains(builtin, []byte("/"+name+".ko\n")) {
				continue
			}
			return nil, fmt.Errorf("find module %s: not in %s/modules.dep nor built in", name, dir)
		}
		if !strings.HasSuffix(rel, ".ko") {
			return nil, fmt.Errorf("find module %s: %s is compressed; the guest's busybox insmod needs .ko", name, rel)
		}
		visit(rel)
	}
	return order, nil
}

// readModulesDep parses "path.ko: dep.ko dep.ko" lines.
func readModulesDep(path string) (map[string][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	defer f.Close()
	deps := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	return deps, nil
}

// writeAtomic writes b to path through a temporary file in the same
// directory renamed into place.
func writeAtomic(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create guest cache: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-initrd-*")
	if err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	return nil
}
