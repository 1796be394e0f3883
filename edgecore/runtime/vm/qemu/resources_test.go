package qemu

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/tetheredge/tether/tests/hugepages"
)

const hugepages2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"

// Guest RAM from hugetlbfs: the test reserves 2 MiB pages and mounts
// hugetlbfs itself (and undoes both). With prealloc=on the guest's 64
// pages are taken when QEMU starts: HugePages_Free drops by exactly that
// while the VM runs (QEMU's mapping holds them, see its smaps)
// and comes back when it exits.
func TestHugepages(t *testing.T) {
	require.Zero(t, os.Geteuid(), "the hugepage test reserves pages and mounts hugetlbfs: run as root")
	hugepages.Lock(t)
	const memMiB = 128
	pages := memMiB / 2

	orig := readInt(t, hugepages2M)
	writeHugepages(t, orig+pages+8) // a little slack for other tests of this machine
	t.Cleanup(func() { writeHugepages(t, orig) })
	require.GreaterOrEqual(t, meminfo(t, "HugePages_Free"), pages, "the kernel gave fewer pages than asked")

	mnt := filepath.Join(t.TempDir(), "hugetlbfs")
	require.NoError(t, os.Mkdir(mnt, 0o700))
	require.NoError(t, unix.Mount("hugetlbfs", mnt, "hugetlbfs", 0, "pagesize=2M"))
	t.Cleanup(func() { require.NoError(t, unix.Unmount(mnt, 0)) })

	spec := guestSpec(t, "huge", 1, memMiB)
	spec.HugepageDir = mnt
	before := meminfo(t, "HugePages_Free")
	m := start(t, spec)
	require.Equal(t, memMiB*1024, hugetlbKB(t, m.Pid()), "guest RAM is not on hugetlbfs")
	require.Eventually(t, func() bool { return meminfo(t, "HugePages_Free") == before-pages },
		time.Minute, 20*time.Millisecond, "free pages %d, want %d", meminfo(t, "HugePages_Free"), before-pages)
	waitBooted(t, m)

	how, err := m.Stop(t.Context(), 2*time.Minute)
	require.NoError(t, err)
	require.Equal(t, EndedPowerdown, how)
	require.Eventually(t, func() bool { return meminfo(t, "HugePages_Free") == before },
		time.Minute, 20*time.Millisecond, "free pages %d after the VM, want %d", meminfo(t, "HugePages_Free"), before)
}

// Dedicated CPUs: with 2 vCPUs pinned to cores 1 and 0 (reversed, so a
// pinning that ignored the order would show), each vCPU thread may run on
// exactly its core, and every other QEMU thread on the shared set.
func TestDedicatedCPUs(t *testing.T) {
	spec := guestSpec(t, "pinned", 2, 128)
	spec.DedicatedCPUs = []int{1, 0}
	spec.SharedCPUs = []int{0}
	m := start(t, spec)
	tids, err := m.VCPUThreads(t.Context())
	require.NoError(t, err)
	require.Len(t, tids, 2)
	require.NotEqual(t, tids[0], tids[1], "one thread per vCPU (multi-threaded TCG)")
	waitBooted(t, m)
	requireAffinity(t, m.Pid(), tids, spec)

	_, err = m.Stop(t.Context(), 2*time.Minute)
	require.NoError(t, err)
}

// requireAffinity checks every thread of pid against the spec's pinning.
func requireAffinity(t *testing.T, pid int, vcpus []int, spec Spec) {
	t.Helper()
	threads, err := Threads(pid)
	require.NoError(t, err)
	require.Greater(t, len(threads), len(vcpus))
	isVCPU := map[int]int{}
	for i, tid := range vcpus {
		isVCPU[tid] = i
	}
	for _, tid := range threads {
		want := cpuList(spec.SharedCPUs)
		if i, ok := isVCPU[tid]; ok {
			want = strconv.Itoa(spec.DedicatedCPUs[i])
		}
		require.Equal(t, want, allowedCPUs(t, pid, tid), "thread %d (%s)", tid, threadName(pid, tid))
	}
}

// allowedCPUs is a thread's Cpus_allowed_list.
func allowedCPUs(t *testing.T, pid, tid int) string {
	for _, l := range strings.Split(readFile(fmt.Sprintf("/proc/%d/task/%d/status", pid, tid)), "\n") {
		if v, ok := strings.CutPrefix(l, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no Cpus_allowed_list for thread %d of %d", tid, pid)
	return ""
}

func cpuList(cpus []int) string {
	s := make([]string, len(cpus))
	for i, c := range cpus {
		s[i] = strconv.Itoa(c)
	}
	return strings.Join(s, ",")
}

func threadName(pid, tid int) string {
	return strings.TrimSpace(readFile(fmt.Sprintf("/proc/%d/task/%d/comm", pid, tid)))
}

func readInt(t *testing.T, path string) int {
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(t, err)
	return n
}

func writeHugepages(t *testing.T, n int) {
	require.NoError(t, os.WriteFile(hugepages2M, []byte(strconv.Itoa(n)), 0o644))
}

// meminfo reads one count of /proc/meminfo.
func meminfo(t *testing.T, key string) int {
	f, err := os.Open("/proc/meminfo")
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && k == key {
			n, err := strconv.Atoi(strings.Fields(v)[0])
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no %s in /proc/meminfo", key)
	return 0
}

// hugetlbKB sums the hugetlb pages pid maps (smaps counts a page mapped
// once as Private_Hugetlb even in a MAP_SHARED mapping).
func hugetlbKB(t *testing.T, pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	require.NoError(t, err)
	defer f.Close()
	total := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && (k == "Shared_Hugetlb" || k == "Private_Hugetlb") {
			n, err := strconv.Atoi(strings.Fields(v)[0])
			require.NoError(t, err)
			total += n
		}
	}
	return total
}
