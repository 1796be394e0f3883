package resources

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

// Hugepages. The pool's limit of a page size is what the kernel holds in
// pages of that size, nr_hugepages × size, read from
// SysfsRoot/kernel/mm/hugepages/hugepages-<kB>kB at every Allocate (so it
// follows an operator who reserves more pages), less nothing else: the
// pages belong to the pool's owners, as the Node advertises them. Guest
// memory comes from a file in a hugetlbfs mount of that size, which the
// grant names.

// sizeName is the Kubernetes spelling of a page size: "2Mi", "1Gi".
func sizeName(size int64) string {
	return resource.NewQuantity(size, resource.BinarySI).String()
}

// HugepageResource is the resource name of a page size, such as
// hugepages-2Mi.
func HugepageResource(size int64) string {
	return corev1.ResourceHugePagesPrefix + sizeName(size)
}

// hugepageLimit is nr_hugepages × size of one page size; a size the
// kernel does not offer is an error.
func hugepageLimit(sysfs string, size int64) (int64, error) {
	if size%1024 != 0 {
		return 0, fmt.Errorf("%w: hugepage size %d is not a whole number of KiB", ErrInvalid, size)
	}
	path := filepath.Join(sysfs, "kernel/mm/hugepages", fmt.Sprintf("hugepages-%dkB", size/1024), "nr_hugepages")
	n, err := readInt(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("%w: the kernel has no hugepages of size %s", ErrInvalid, sizeName(size))
	}
	if err != nil {
		return 0, fmt.Errorf("read hugepages of size %s: %w", sizeName(size), err)
	}
	return n * size, nil
}

// discoverHugepageMounts reads proc/mounts: the first hugetlbfs mount of
// each page size. A mount without pagesize= has the default size
// (Hugepagesize of proc/meminfo).
func discoverHugepageMounts(proc string) (map[int64]string, error) {
	b, err := os.ReadFile(filepath.Join(proc, "mounts"))
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	var deflt int64
	if m, err := os.ReadFile(filepath.Join(proc, "meminfo")); err == nil {
		deflt = parseDefaultHugepageSize(bytes.NewReader(m))
	}
	return ParseHugetlbfsMounts(bytes.NewReader(b), deflt)
}

// ParseHugetlbfsMounts returns the first hugetlbfs mount point of each
// page size in a mounts file (the format of /proc/mounts: device, mount
// point with octal escapes, type, options). A mount without pagesize=
// has the size deflt; with deflt 0 it is skipped.
func ParseHugetlbfsMounts(r io.Reader, deflt int64) (map[int64]string, error) {
	out := map[int64]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || f[2] != "hugetlbfs" {
			continue
		}
		size := deflt
		for opt := range strings.SplitSeq(f[3], ",") {
			if v, ok := strings.CutPrefix(opt, "pagesize="); ok {
				n, err := parseMountSize(v)
				if err != nil {
					return nil, fmt.Errorf("parse mount of %s: %w", f[1], err)
				}
				size = n
			}
		}
		if size <= 0 {
			continue
		}
		if _, ok := out[size]; !ok {
			out[size] = unescapeMount(f[1])
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("scan mounts: %w", err)
	}
	return out, nil
}

// parseMountSize reads hugetlbfs' pagesize= option as the kernel prints
// it: a number with a K, M or G suffix (2M, 1024M, 1G).
func parseMountSize(v string) (int64, error) {
	if v == "" {
		return 0, errors.New("empty pagesize")
	}
	mult := int64(1)
	switch v[len(v)-1] {
	case 'K', 'k':
		mult = 1 << 10
	case 'M', 'm':
		mult = 1 << 20
	case 'G', 'g':
		mult = 1 << 30
	}
	if mult != 1 {
		v = v[:len(v)-1]
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("bad pagesize %q", v)
	}
	return n * mult, nil
}

// parseDefaultHugepageSize returns Hugepagesize of meminfo in bytes, or 0.
func parseDefaultHugepageSize(r io.Reader) int64 {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 3 && f[0] == "Hugepagesize:" && f[2] == "kB" {
			if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil && kb > 0 {
				return kb << 10
			}
		}
	}
	return 0
}

// unescapeMount undoes the kernel's octal escapes of a mount point
// (\040 for a space, \011, \012, \134): the kernel escapes nothing else,
// and those are Go's octal escapes too.
func unescapeMount(s string) string {
	if u, err := strconv.Unquote(`"` + strings.ReplaceAll(s, `"`, `\"`) + `"`); err == nil {
		return u
	}
	return s
}

// readInt reads a sysfs file holding one integer.
func readInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("read %s: not a non-negative integer: %q", path, strings.TrimSpace(string(b)))
	}
	return n, nil
}
