// Package hostinfo reads what an edge host says about itself: CPUs, memory,
// huge pages, the size of a filesystem, and the identity and software of the
// machine (kernel, OS image, machine, system and boot ids). EdgeCore reports
// these in its Node (edgecore/nodestatus).
//
// Every file is read below a root directory (Read's root, "/" on a real
// host), so tests give it a synthetic /proc, /sys and /etc tree. It reads
// files only: it never writes, runs commands or keeps state.
package hostinfo

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Facts are one reading of the host.
type Facts struct {
	// CPUs is the number of online CPUs (/sys/devices/system/cpu/online;
	// else the processors in /proc/cpuinfo; else runtime.NumCPU).
	CPUs int64
	// MemoryBytes is MemTotal of /proc/meminfo, huge pages included (as
	// kubelet reports memory capacity).
	MemoryBytes int64
	// HugePages maps a page size in bytes to the bytes reserved in pages of
	// that size (nr_hugepages × size), for every size under
	// /sys/kernel/mm/hugepages, 0 included.
	HugePages map[int64]int64
	// KernelVersion is /proc/sys/kernel/osrelease (uname -r).
	KernelVersion string
	// OSImage is PRETTY_NAME of /etc/os-release (else
	// /usr/lib/os-release); "Linux" when neither names one.
	OSImage string
	// MachineID is /etc/machine-id; empty if absent.
	MachineID string
	// SystemUUID is /sys/class/dmi/id/product_uuid; empty if absent or
	// unreadable (it is readable by root only, and absent in many VMs).
	SystemUUID string
	// BootID is /proc/sys/kernel/random/boot_id.
	BootID string
}

// Read reads the host below root. The CPU count, memory and kernel version
// are required: when one cannot be read Read returns what it has with an
// error naming each. The ids and the OS image are optional and left empty
// (OSImage "Linux") when absent.
func Read(root string) (Facts, error) {
	path := func(p string) string { return filepath.Join(root, p) }
	var errs []error
	f := Facts{OSImage: "Linux"}

	f.CPUs = cpus(path, &errs)
	if b, err := os.ReadFile(path("proc/meminfo")); err != nil {
		errs = append(errs, fmt.Errorf("read memory: %w", err))
	} else if f.MemoryBytes, err = ParseMemTotal(bytes.NewReader(b)); err != nil {
		errs = append(errs, fmt.Errorf("read memory: %w", err))
	}
	hp, err := hugePages(path("sys/kernel/mm/hugepages"))
	if err != nil {
		errs = append(errs, err)
	}
	f.HugePages = hp
	if f.KernelVersion, err = firstLine(path("proc/sys/kernel/osrelease")); err != nil {
		errs = append(errs, fmt.Errorf("read kernel version: %w", err))
	}
	for _, p := range []string{"etc/os-release", "usr/lib/os-release"} {
		if b, err := os.ReadFile(path(p)); err == nil {
			if name := ParseOSRelease(bytes.NewReader(b)); name != "" {
				f.OSImage = name
			}
			break
		}
	}
	f.MachineID, _ = firstLine(path("etc/machine-id"))
	f.SystemUUID, _ = firstLine(path("sys/class/dmi/id/product_uuid"))
	f.BootID, _ = firstLine(path("proc/sys/kernel/random/boot_id"))
	return f, errors.Join(errs...)
}

// cpus counts the online CPUs, falling back as Facts.CPUs says.
func cpus(path func(string) string, errs *[]error) int64 {
	if s, err := firstLine(path("sys/devices/system/cpu/online")); err == nil {
		n, err := ParseCPUList(s)
		if err == nil {
			return int64(n)
		}
		*errs = append(*errs, fmt.Errorf("read online cpus: %w", err))
		return int64(runtime.NumCPU())
	}
	if b, err := os.ReadFile(path("proc/cpuinfo")); err == nil {
		if n := CountProcessors(bytes.NewReader(b)); n > 0 {
			return int64(n)
		}
	}
	return int64(runtime.NumCPU())
}

// StorageBytes returns the size of the filesystem that holds path (statfs:
// blocks × fragment size), as kubelet reports ephemeral-storage capacity
// for its root directory's filesystem.
func StorageBytes(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	size := st.Frsize
	if size == 0 {
		size = st.Bsize
	}
	return int64(st.Blocks) * size, nil //nolint:gosec // a filesystem's size fits in int64
}

// ParseCPUList counts the CPUs of a kernel CPU list such as "0-3,8,10-11"
// (the format of /sys/devices/system/cpu/online and cpuset files).
func ParseCPUList(s string) (int, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, errors.New("empty cpu list")
	}
	n := 0
	for part := range strings.SplitSeq(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil || a < 0 {
			return 0, fmt.Errorf("parse cpu list %q: bad cpu %q", s, lo)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				return 0, fmt.Errorf("parse cpu list %q: bad range %q", s, part)
			}
		}
		n += b - a + 1
	}
	return n, nil
}

// CountProcessors counts the "processor" entries of /proc/cpuinfo.
func CountProcessors(r io.Reader) int {
	n := 0
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if k, _, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "processor" {
			n++
		}
	}
	return n
}

// ParseMemTotal returns MemTotal of /proc/meminfo, in bytes.
func ParseMemTotal(r io.Reader) (int64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "MemTotal:" {
			continue
		}
		kb, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil || kb <= 0 || (len(fields) > 2 && fields[2] != "kB") {
			return 0, fmt.Errorf("parse MemTotal %q", sc.Text())
		}
		return kb * 1024, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("scan meminfo: %w", err)
	}
	return 0, errors.New("no MemTotal in meminfo")
}

// ParseOSRelease returns PRETTY_NAME of an os-release file (quotes and
// shell escapes removed), or "" when it has none.
func ParseOSRelease(r io.Reader) string {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "=")
		if !ok || k != "PRETTY_NAME" {
			continue
		}
		if n := len(v); n >= 2 && (v[0] == '"' || v[0] == '\'') && v[n-1] == v[0] {
			v = v[1 : n-1]
		}
		return strings.NewReplacer(`\"`, `"`, `\\`, `\`, `\$`, `$`, "\\`", "`").Replace(v)
	}
	return ""
}

// ParseHugePageSize returns the page size in bytes named by a directory of
// /sys/kernel/mm/hugepages, such as "hugepages-2048kB".
func ParseHugePageSize(dir string) (int64, error) {
	s, ok := strings.CutPrefix(dir, "hugepages-")
	if !ok {
		return 0, fmt.Errorf("parse huge page size %q: no hugepages- prefix", dir)
	}
	s, ok = strings.CutSuffix(s, "kB")
	kb, err := strconv.ParseInt(s, 10, 64)
	if !ok || err != nil || kb <= 0 {
		return 0, fmt.Errorf("parse huge page size %q: want hugepages-<n>kB", dir)
	}
	return kb * 1024, nil
}

// hugePages reads every page size under dir: nr_hugepages × size. A host
// without the directory (no huge page support) has none.
func hugePages(dir string) (map[int64]int64, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return map[int64]int64{}, nil
	}
	if err != nil {
		return map[int64]int64{}, fmt.Errorf("read huge pages: %w", err)
	}
	out := map[int64]int64{}
	var errs []error
	for _, e := range entries {
		size, err := ParseHugePageSize(e.Name())
		if err != nil {
			continue // not a page size directory
		}
		s, err := firstLine(filepath.Join(dir, e.Name(), "nr_hugepages"))
		if err != nil {
			errs = append(errs, fmt.Errorf("read huge pages: %w", err))
			continue
		}
		nr, err := strconv.ParseInt(s, 10, 64)
		if err != nil || nr < 0 {
			errs = append(errs, fmt.Errorf("read huge pages %s: bad nr_hugepages %q", e.Name(), s))
			continue
		}
		out[size] = nr * size
	}
	return out, errors.Join(errs...)
}

// firstLine reads a one-line file, trimmed; an empty file is an error.
func firstLine(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	line = strings.TrimSpace(line)
	if line == "" {
		return "", fmt.Errorf("read %s: empty", path)
	}
	return line, nil
}
