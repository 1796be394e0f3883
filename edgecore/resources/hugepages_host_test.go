package resources

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/tetheredge/tether/edgecore/hostinfo"
	"github.com/tetheredge/tether/edgecore/nodestatus"
)

const nr2Mi = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"

// reserve2Mi adds n pages of 2 MiB through the real sysfs and mounts a
// hugetlbfs of that size in a temporary directory; cleanup unmounts it
// and takes back the pages it added (by difference: other tests on this
// machine reserve pages too). It needs root, as the rest of the runtime
// tests do.
func reserve2Mi(t *testing.T, n int64) (mount string) {
	t.Helper()
	require.Zero(t, os.Geteuid(), "reserving hugepages needs root (the runtime tests run as root)")
	before := readNr(t)
	require.NoError(t, os.WriteFile(nr2Mi, []byte(strconv.FormatInt(before+n, 10)), 0o644))
	added := readNr(t) - before
	t.Cleanup(func() {
		now := readNr(t)
		require.NoError(t, os.WriteFile(nr2Mi, []byte(strconv.FormatInt(max(now-added, 0), 10)), 0o644))
	})
	require.Positive(t, added, "the kernel gave no 2 MiB pages")
	mount = t.TempDir()
	require.NoError(t, unix.Mount("none", mount, "hugetlbfs", 0, "pagesize=2M"))
	t.Cleanup(func() { require.NoError(t, unix.Unmount(mount, 0)) })
	return mount
}

func readNr(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile(nr2Mi)
	require.NoError(t, err)
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	require.NoError(t, err)
	return n
}

// stable runs f between two readings of nr_hugepages until both agree
// (other tests on this shared machine change it too) and gives f the
// reading.
func stable(t *testing.T, f func(nr int64) bool) {
	t.Helper()
	for range 20 {
		nr := readNr(t)
		ok := f(nr)
		if readNr(t) == nr {
			require.True(t, ok, "at nr_hugepages %d", nr)
			return
		}
	}
	t.Fatal("nr_hugepages kept changing")
}

// On the real sysfs: pages reserved through nr_hugepages become the
// pool's hugepage limit and the Node's hugepages-2Mi (capacity and
// allocatable), and a grant names the hugetlbfs mount, which the mounts
// discovery finds in /proc/self/mounts; a mount configured for another
// page size than its own is refused.
func TestHugepagesOnRealSysfs(t *testing.T) {
	ctx := t.Context()
	mount := reserve2Mi(t, 8)

	b, err := os.ReadFile("/proc/self/mounts")
	require.NoError(t, err)
	found := false
	for line := range strings.SplitSeq(string(b), "\n") {
		got, err := ParseHugetlbfsMounts(strings.NewReader(line), 0)
		require.NoError(t, err)
		found = found || got[Hugepage2Mi] == mount
	}
	require.True(t, found, "%s not among the 2Mi hugetlbfs mounts of /proc/self/mounts", mount)

	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	_, err = New(Config{HugepageMounts: map[int64]string{Hugepage1Gi: mount}}, st.Allocations(), nil)
	require.ErrorContains(t, err, "HugepageMounts[1Gi]: \""+mount+"\" is a hugetlbfs of page size 2Mi")
	p := newPool(t, Config{HugepageMounts: map[int64]string{Hugepage2Mi: mount}}, st)
	stable(t, func(nr int64) bool {
		f, err := hostinfo.Read("/")
		r, rerr := nodestatus.New(nodestatus.Config{Node: "edge-1", EvictionHard: map[string]string{}}, nil, nil)
		if err != nil || rerr != nil {
			return false
		}
		n := r.Node()
		c, a := n.Status.Capacity["hugepages-2Mi"], n.Status.Allocatable["hugepages-2Mi"]
		return f.HugePages[Hugepage2Mi] == nr*Hugepage2Mi && c.Value() == nr*Hugepage2Mi && a.Value() == nr*Hugepage2Mi
	})

	// The whole limit fits, one page more does not.
	stable(t, func(nr int64) bool {
		g, err := p.Allocate(ctx, Request{Owner: "all", HugepageSize: Hugepage2Mi, HugepageBytes: nr * Hugepage2Mi})
		if err != nil || g.HugepageDir != mount {
			return false
		}
		_, err = p.Allocate(ctx, Request{Owner: "more", HugepageSize: Hugepage2Mi, HugepageBytes: Hugepage2Mi})
		var ie *InsufficientError
		short := errors.As(err, &ie) && ie.Resource == "hugepages-2Mi" && ie.Free == 0
		return p.Release(ctx, "all") == nil && short
	})
}
