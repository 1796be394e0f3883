package resources

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"k8s.io/utils/cpuset"
)

// Config configures a Pool. Zero values mean the defaults beside each
// field; New fills them into a copy and refuses a bad field by name.
type Config struct {
	// CPUs is the node's CPU set as a kernel CPU list ("0-7,16-23").
	// Empty: the online CPUs, SysfsRoot/devices/system/cpu/online.
	CPUs string
	// ReservedSystemCPUs are cores kept for the operating system and
	// EdgeCore itself, as kubelet's --reserved-cpus: never dedicated to
	// a sandbox, not in the shared set, not allocatable. A CPU list;
	// empty: none. Must lie inside CPUs.
	ReservedSystemCPUs string
	// ReservedDataPlaneCPUs are cores kept for the data plane (a DPDK or
	// OVS forwarding loop): the same rules as ReservedSystemCPUs, and the
	// two sets must not overlap. Empty: none.
	ReservedDataPlaneCPUs string
	// HugepageMounts maps a page size in bytes (Hugepage2Mi,
	// Hugepage1Gi) to a hugetlbfs mount of that size. Nil: discovered
	// from ProcRoot/mounts (the first hugetlbfs mount of each pagesize=,
	// or of the default size when it names none). A size without a mount
	// cannot be granted.
	HugepageMounts map[int64]string
	// SysfsRoot is where sysfs is mounted. Default "/sys". Tests point it
	// at a synthetic tree: this machine has no SR-IOV NIC and no VFIO.
	SysfsRoot string
	// ProcRoot is where procfs is mounted (mounts, meminfo). Default
	// "/proc".
	ProcRoot string
	// VFPools maps a pool name to the PCI addresses of its physical
	// functions ("0000:3b:00.0"); each PF's VFs are the pool's. The Node
	// advertises sriov.edge.tether.dev/<pool>. Nil: no pools. A PF may
	// be in one pool only.
	VFPools map[string][]string
	// Registerer, when set, gets the pool's metrics.
	Registerer prometheus.Registerer
}

// ResourcePrefixVF prefixes the extended resource of a VF pool.
const ResourcePrefixVF = "sriov.edge.tether.dev/"

// settings is a validated Config.
type settings struct {
	cpus, reserved, dataPlane cpuset.CPUSet
	// allocatable is cpus less both reserved sets.
	allocatable cpuset.CPUSet
	mounts      map[int64]string
	sysfs, proc string
	pools       map[string][]string
	poolNames   []string // sorted
	// notHugetlbfs are configured mounts that are not hugetlbfs (New
	// warns: guest memory there would not come from hugepages).
	notHugetlbfs []string
}

var (
	pciAddress = regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)
	// poolName keeps sriov.edge.tether.dev/<pool> a valid resource
	// name: a qualified name's name part.
	poolName = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$`)
)

// validate fills the defaults into a copy of cfg and checks every field.
func validate(cfg Config) (settings, error) {
	s := settings{sysfs: cfg.SysfsRoot, proc: cfg.ProcRoot}
	if s.sysfs == "" {
		s.sysfs = "/sys"
	}
	if s.proc == "" {
		s.proc = "/proc"
	}
	var err error
	list := cfg.CPUs
	if list == "" {
		b, err := os.ReadFile(filepath.Join(s.sysfs, "devices/system/cpu/online"))
		if err != nil {
			return s, fmt.Errorf("resources config: CPUs: read online cpus: %w", err)
		}
		list = strings.TrimSpace(string(b))
	}
	if s.cpus, err = parseCPUs("CPUs", list); err != nil {
		return s, err
	}
	if s.cpus.IsEmpty() {
		return s, errors.New("resources config: CPUs: empty")
	}
	if s.reserved, err = parseCPUs("ReservedSystemCPUs", cfg.ReservedSystemCPUs); err != nil {
		return s, err
	}
	if s.dataPlane, err = parseCPUs("ReservedDataPlaneCPUs", cfg.ReservedDataPlaneCPUs); err != nil {
		return s, err
	}
	for _, r := range []struct {
		name string
		set  cpuset.CPUSet
	}{{"ReservedSystemCPUs", s.reserved}, {"ReservedDataPlaneCPUs", s.dataPlane}} {
		if out := r.set.Difference(s.cpus); !out.IsEmpty() {
			return s, fmt.Errorf("resources config: %s: cpus %s are not in the node's cpus %s", r.name, out, s.cpus)
		}
	}
	if both := s.reserved.Intersection(s.dataPlane); !both.IsEmpty() {
		return s, fmt.Errorf("resources config: ReservedSystemCPUs and ReservedDataPlaneCPUs overlap in cpus %s", both)
	}
	s.allocatable = s.cpus.Difference(s.reserved.Union(s.dataPlane))

	if cfg.HugepageMounts != nil {
		s.mounts = maps.Clone(cfg.HugepageMounts)
	} else if s.mounts, err = discoverHugepageMounts(s.proc); err != nil {
		return s, fmt.Errorf("resources config: HugepageMounts: %w", err)
	}
	for size, dir := range s.mounts {
		if size <= 0 {
			return s, fmt.Errorf("resources config: HugepageMounts: page size %d is not positive", size)
		}
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			return s, fmt.Errorf("resources config: HugepageMounts[%s]: %q is not a directory", sizeName(size), dir)
		}
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.HUGETLBFS_MAGIC && st.Bsize != size {
			// hugetlbfs reports its page size as the block size.
			return s, fmt.Errorf("resources config: HugepageMounts[%s]: %q is a hugetlbfs of page size %s", sizeName(size), dir, sizeName(st.Bsize))
		} else if err == nil && st.Type != unix.HUGETLBFS_MAGIC {
			s.notHugetlbfs = append(s.notHugetlbfs, dir)
		}
	}

	s.pools = map[string][]string{}
	owner := map[string]string{} // PF -> pool
	for name, pfs := range cfg.VFPools {
		if !poolName.MatchString(name) {
			return s, fmt.Errorf("resources config: VFPools: pool name %q is not a valid resource name (letters, digits, '-', '_', '.'; at most 63)", name)
		}
		if len(pfs) == 0 {
			return s, fmt.Errorf("resources config: VFPools[%s]: no physical functions", name)
		}
		for _, pf := range pfs {
			if !pciAddress.MatchString(pf) {
				return s, fmt.Errorf("resources config: VFPools[%s]: %q is not a PCI address (want 0000:3b:00.0)", name, pf)
			}
			if other, ok := owner[pf]; ok {
				return s, fmt.Errorf("resources config: VFPools[%s]: PF %s is already in pool %s", name, pf, other)
			}
			owner[pf] = name
			if _, err := readInt(filepath.Join(s.sysfs, "bus/pci/devices", pf, "sriov_totalvfs")); err != nil {
				return s, fmt.Errorf("resources config: VFPools[%s]: PF %s is not an SR-IOV device: %w", name, pf, err)
			}
		}
		s.pools[name] = slices.Sorted(slices.Values(pfs))
		s.poolNames = append(s.poolNames, name)
	}
	slices.Sort(s.poolNames)
	return s, nil
}

func parseCPUs(field, list string) (cpuset.CPUSet, error) {
	set, err := cpuset.Parse(strings.TrimSpace(list))
	if err != nil {
		return set, fmt.Errorf("resources config: %s: %w", field, err)
	}
	return set, nil
}
