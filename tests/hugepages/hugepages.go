// Package hugepages reserves real 2 MiB hugepages and mounts hugetlbfs for
// a test, and undoes both when the test ends. It needs root (it writes
// nr_hugepages and mounts).
package hugepages

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// NrHugepages is the kernel's count of reserved 2 MiB pages.
const NrHugepages = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"

// Lock holds the host's hugepage lock (an flock on a file in the
// temporary directory) until the test ends. The kernel's reservation, its
// free count and the hugetlbfs mounts are one per host, and go test runs
// packages in parallel: every test that reserves pages, mounts hugetlbfs,
// counts free pages or expects no mount takes the lock (Reserve does), so
// that another package's test never shows up in its figures. A test
// takes it once: a second Lock in the same test waits for itself.
func Lock(tb testing.TB) {
	tb.Helper()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "tether-hugepages.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	require.NoError(tb, err)
	require.NoError(tb, syscall.Flock(int(f.Fd()), syscall.LOCK_EX))
	tb.Cleanup(func() { require.NoError(tb, f.Close()) }) // closing releases the lock
}

// Reserve takes the hugepage lock, adds pages 2 MiB pages to the kernel's
// reservation and mounts a hugetlbfs of that page size in a temporary
// directory, whose path it returns. All is undone at the test's cleanup.
func Reserve(tb testing.TB, pages int64) string {
	tb.Helper()
	Lock(tb)
	before := readInt(tb, NrHugepages)
	require.NoError(tb, os.WriteFile(NrHugepages, []byte(strconv.FormatInt(before+pages, 10)), 0o644))
	tb.Cleanup(func() {
		now := readInt(tb, NrHugepages)
		require.NoError(tb, os.WriteFile(NrHugepages, []byte(strconv.FormatInt(max(now-pages, 0), 10)), 0o644))
	})
	require.GreaterOrEqual(tb, readInt(tb, NrHugepages), before+pages, "the kernel reserved the pages")
	mnt := tb.TempDir()
	require.NoError(tb, syscall.Mount("hugetlbfs", mnt, "hugetlbfs", 0, "pagesize=2M"))
	tb.Cleanup(func() { require.NoError(tb, syscall.Unmount(mnt, 0)) })
	return mnt
}

// Free is HugePages_Free of /proc/meminfo (2 MiB pages, the default size).
func Free(tb testing.TB) int64 {
	tb.Helper()
	data, err := os.ReadFile("/proc/meminfo")
	require.NoError(tb, err)
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "HugePages_Free:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			require.NoError(tb, err)
			return n
		}
	}
	tb.Fatal("no HugePages_Free in /proc/meminfo")
	return 0
}

func readInt(tb testing.TB, path string) int64 {
	tb.Helper()
	data, err := os.ReadFile(path)
	require.NoError(tb, err)
	n, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	require.NoError(tb, err)
	return n
}
