package resources

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tetheredge/tether/tests/hugepages"

	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/testlog"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func openStore(t *testing.T, path string) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), path, testlog.New())
	require.NoError(t, err)
	t.Cleanup(func() { _ = st.Close() })
	return st
}

func newPool(t *testing.T, cfg Config, st *store.Store) *Pool {
	t.Helper()
	p, err := New(cfg, st.Allocations(), testlog.New())
	require.NoError(t, err)
	return p
}

func requireInsufficient(t *testing.T, err error, resource string, requested, free int64) {
	t.Helper()
	var ie *InsufficientError
	require.ErrorAs(t, err, &ie)
	require.ErrorIs(t, err, ErrInsufficient)
	require.Equal(t, InsufficientError{Resource: resource, Requested: requested, Free: free}, *ie)
}

func requireHoldsNothing(t *testing.T, st *store.Store, owner string) {
	t.Helper()
	rows, err := st.Allocations().Owner(context.Background(), owner)
	require.NoError(t, err)
	require.Empty(t, rows, "rows of %s", owner)
}

func TestConfigRefused(t *testing.T) {
	s := newSynth(t, "0-7")
	s.pf("0000:3b:00.0", 4, "iavf", "0000:3b:02.0")
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	base := func() Config {
		return Config{SysfsRoot: s.root, HugepageMounts: map[int64]string{}}
	}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"bad node cpus", func(c *Config) { c.CPUs = "0-x" }, "resources config: CPUs:"},
		{"no online file", func(c *Config) { c.SysfsRoot = t.TempDir() }, "resources config: CPUs: read online cpus"},
		{"bad reserved", func(c *Config) { c.ReservedSystemCPUs = "3-1" }, "resources config: ReservedSystemCPUs:"},
		{"reserved outside the node", func(c *Config) { c.ReservedSystemCPUs = "6-9" }, "ReservedSystemCPUs: cpus 8-9 are not in the node's cpus 0-7"},
		{"data plane outside the node", func(c *Config) { c.ReservedDataPlaneCPUs = "12" }, "ReservedDataPlaneCPUs: cpus 12 are not in the node's cpus 0-7"},
		{"overlap", func(c *Config) { c.ReservedSystemCPUs = "0-2"; c.ReservedDataPlaneCPUs = "2-3" }, "ReservedSystemCPUs and ReservedDataPlaneCPUs overlap in cpus 2"},
		{"mount not a directory", func(c *Config) { c.HugepageMounts = map[int64]string{Hugepage2Mi: "/nonexistent"} }, `HugepageMounts[2Mi]: "/nonexistent" is not a directory`},
		{"bad page size", func(c *Config) { c.HugepageMounts = map[int64]string{-1: t.TempDir()} }, "page size -1 is not positive"},
		{"bad pool name", func(c *Config) { c.VFPools = map[string][]string{"a/b": {"0000:3b:00.0"}} }, `pool name "a/b" is not a valid resource name`},
		{"pool without PFs", func(c *Config) { c.VFPools = map[string][]string{"a": nil} }, "VFPools[a]: no physical functions"},
		{"bad PF address", func(c *Config) { c.VFPools = map[string][]string{"a": {"3b:00.0"}} }, `VFPools[a]: "3b:00.0" is not a PCI address`},
		{"PF in two pools", func(c *Config) {
			c.VFPools = map[string][]string{"a": {"0000:3b:00.0"}, "b": {"0000:3b:00.0"}}
		}, "is already in pool"},
		{"PF without SR-IOV", func(c *Config) { c.VFPools = map[string][]string{"a": {"0000:3b:00.1"}} }, "VFPools[a]: PF 0000:3b:00.1 is not an SR-IOV device"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := base()
			tc.edit(&cfg)
			_, err := New(cfg, st.Allocations(), nil)
			require.ErrorContains(t, err, tc.want)
		})
	}
	// The defaults: the online CPUs, nothing reserved.
	p, err := New(base(), st.Allocations(), nil)
	require.NoError(t, err)
	shared, err := p.SharedCPUs(t.Context())
	require.NoError(t, err)
	require.Equal(t, []int{0, 1, 2, 3, 4, 5, 6, 7}, shared)
}

// Dedicated cores come from the allocatable set (never a reserved core),
// lowest first; the shared set is what no one holds; a request that does
// not fit names cpu and claims nothing; a restarted pool (a new store
// handle on the same file) looks up the same grant and keeps the cores
// taken.
func TestDedicatedCPUs(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-7")
	path := filepath.Join(t.TempDir(), "edge.db")
	st := openStore(t, path)
	cfg := Config{SysfsRoot: s.root, HugepageMounts: map[int64]string{}, ReservedSystemCPUs: "0", ReservedDataPlaneCPUs: "1"}
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	p := newPool(t, cfg, st)

	a, err := p.Allocate(ctx, Request{Owner: "sb-a", DedicatedCPUs: 2})
	require.NoError(t, err)
	require.Equal(t, Grant{Owner: "sb-a", CPUs: []int{2, 3}, SharedCPUs: []int{4, 5, 6, 7}}, a)
	b, err := p.Allocate(ctx, Request{Owner: "sb-b", DedicatedCPUs: 3})
	require.NoError(t, err)
	require.Equal(t, []int{4, 5, 6}, b.CPUs)
	require.Equal(t, []int{7}, b.SharedCPUs)
	none, err := p.Allocate(ctx, Request{Owner: "sb-shared"})
	require.NoError(t, err)
	require.Empty(t, none.CPUs)
	require.Equal(t, []int{7}, none.SharedCPUs)

	_, err = p.Allocate(ctx, Request{Owner: "sb-c", DedicatedCPUs: 2})
	requireInsufficient(t, err, "cpu", 2, 1)
	requireHoldsNothing(t, st, "sb-c")
	require.InDelta(t, 1, testutil.ToFloat64(p.requests.WithLabelValues("insufficient")), 0)

	// The same request again is the same grant; another request is refused.
	again, err := p.Allocate(ctx, Request{Owner: "sb-a", DedicatedCPUs: 2})
	require.NoError(t, err)
	require.Equal(t, a, again)
	_, err = p.Allocate(ctx, Request{Owner: "sb-a", DedicatedCPUs: 1})
	require.ErrorIs(t, err, ErrInvalid)

	// A restart: the grants are found again, and the cores stay taken.
	require.NoError(t, st.Close())
	st = openStore(t, path)
	p = newPool(t, Config{SysfsRoot: s.root, HugepageMounts: map[int64]string{}, ReservedSystemCPUs: "0", ReservedDataPlaneCPUs: "1"}, st)
	got, ok, err := p.Lookup(ctx, "sb-a")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, a, got)
	_, ok, err = p.Lookup(ctx, "sb-c")
	require.NoError(t, err)
	require.False(t, ok)
	_, err = p.Allocate(ctx, Request{Owner: "sb-c", DedicatedCPUs: 2})
	requireInsufficient(t, err, "cpu", 2, 1)

	require.NoError(t, p.Release(ctx, "sb-a"))
	require.NoError(t, p.Release(ctx, "sb-a"), "release is idempotent")
	shared, err := p.SharedCPUs(ctx)
	require.NoError(t, err)
	require.Equal(t, []int{2, 3, 7}, shared)
	c, err := p.Allocate(ctx, Request{Owner: "sb-c", DedicatedCPUs: 2})
	require.NoError(t, err)
	require.Equal(t, []int{2, 3}, c.CPUs)
}

func TestRequestRefused(t *testing.T) {
	hugepages.Lock(t) // it expects no hugetlbfs mount of 2Mi pages on the host
	s := newSynth(t, "0-3")
	s.pf("0000:3b:00.0", 4, "iavf", "0000:3b:02.0")
	s.hugepages(Hugepage2Mi, 4)
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	p := newPool(t, Config{SysfsRoot: s.root, VFPools: map[string][]string{"a": {"0000:3b:00.0"}}}, st)
	for _, tc := range []struct {
		name string
		req  Request
		want string
	}{
		{"no owner", Request{DedicatedCPUs: 1}, "no owner"},
		{"long owner", Request{Owner: strings.Repeat("x", store.MaxAllocationField+1)}, "owner is 257 bytes"},
		{"negative cpus", Request{Owner: "o", DedicatedCPUs: -1}, "-1 dedicated cpus"},
		{"bytes without size", Request{Owner: "o", HugepageBytes: 4 << 20}, "hugepage bytes of page size 0"},
		{"partial page", Request{Owner: "o", HugepageSize: Hugepage2Mi, HugepageBytes: 3 << 20}, "not a whole number of 2Mi pages"},
		{"unknown pool", Request{Owner: "o", VFs: map[string]int{"b": 1}}, `no VF pool "b" on this node (pools: a)`},
		{"negative VFs", Request{Owner: "o", VFs: map[string]int{"a": -1}}, "-1 VFs of pool a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.Allocate(t.Context(), tc.req)
			require.ErrorIs(t, err, ErrInvalid)
			require.ErrorContains(t, err, tc.want)
		})
	}
	// No hugetlbfs mount of the size: refused as not set up, naming it.
	_, err := p.Allocate(t.Context(), Request{Owner: "o", HugepageSize: Hugepage2Mi, HugepageBytes: 2 << 20})
	require.ErrorIs(t, err, ErrUnavailable)
	require.ErrorContains(t, err, "no hugetlbfs mount of page size 2Mi")
	requireHoldsNothing(t, st, "o")
}

// Hugepages against the synthetic tree: the limit is nr_hugepages × size
// at the time of the request; the grant names the mount.
func TestHugepagesLimit(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-3")
	s.hugepages(Hugepage2Mi, 4)
	s.hugepages(Hugepage1Gi, 0)
	mnt := t.TempDir()
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	p := newPool(t, Config{SysfsRoot: s.root, HugepageMounts: map[int64]string{Hugepage2Mi: mnt, Hugepage1Gi: t.TempDir()}}, st)

	g, err := p.Allocate(ctx, Request{Owner: "a", HugepageSize: Hugepage2Mi, HugepageBytes: 6 << 20})
	require.NoError(t, err)
	require.Equal(t, mnt, g.HugepageDir)
	_, err = p.Allocate(ctx, Request{Owner: "b", HugepageSize: Hugepage2Mi, HugepageBytes: 4 << 20})
	requireInsufficient(t, err, "hugepages-2Mi", 4<<20, 2<<20)
	requireHoldsNothing(t, st, "b")
	_, err = p.Allocate(ctx, Request{Owner: "b", HugepageSize: Hugepage1Gi, HugepageBytes: 1 << 30})
	requireInsufficient(t, err, "hugepages-1Gi", 1<<30, 0)

	s.hugepages(Hugepage2Mi, 8) // the operator reserves more
	_, err = p.Allocate(ctx, Request{Owner: "b", HugepageSize: Hugepage2Mi, HugepageBytes: 4 << 20})
	require.NoError(t, err)
	require.NoError(t, p.Release(ctx, "a"))
	_, err = p.Allocate(ctx, Request{Owner: "c", HugepageSize: Hugepage2Mi, HugepageBytes: 12 << 20})
	require.NoError(t, err)
}

// Release gives back only what the pool granted: the VM record of the
// same sandbox stays for its backend to remove.
func TestReleaseKeepsOtherRows(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-3")
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	p := newPool(t, Config{SysfsRoot: s.root, HugepageMounts: map[int64]string{}}, st)
	_, err := p.Allocate(ctx, Request{Owner: "sb", DedicatedCPUs: 1})
	require.NoError(t, err)
	require.NoError(t, st.Allocations().Claim(ctx, "sb", []store.Allocation{{Kind: "vm", Item: "sb", Detail: []byte(`{"pid":1}`)}}, nil))
	require.NoError(t, p.Release(ctx, "sb"))
	rows, err := st.Allocations().Owner(ctx, "sb")
	require.NoError(t, err)
	require.Len(t, rows, 1)
	require.Equal(t, "vm", rows[0].Kind)
	_, ok, err := p.Lookup(ctx, "sb")
	require.NoError(t, err)
	require.False(t, ok)
}

func TestParseHugetlbfsMounts(t *testing.T) {
	mounts := strings.Join([]string{
		"proc /proc proc rw,nosuid 0 0",
		"hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0",
		"none /mnt/huge\\0401g hugetlbfs rw,pagesize=1024M 0 0",
		"none /mnt/second hugetlbfs rw,pagesize=2M 0 0",
		"none /mnt/default hugetlbfs rw,relatime 0 0",
		"tmpfs /tmp tmpfs rw 0 0",
	}, "\n")
	got, err := ParseHugetlbfsMounts(strings.NewReader(mounts), 0)
	require.NoError(t, err)
	require.Equal(t, map[int64]string{Hugepage2Mi: "/dev/hugepages", Hugepage1Gi: "/mnt/huge 1g"}, got)
	got, err = ParseHugetlbfsMounts(strings.NewReader("none /mnt/default hugetlbfs rw,relatime 0 0\n"), Hugepage2Mi)
	require.NoError(t, err)
	require.Equal(t, map[int64]string{Hugepage2Mi: "/mnt/default"}, got)
	_, err = ParseHugetlbfsMounts(strings.NewReader("none /x hugetlbfs rw,pagesize=lots 0 0\n"), 0)
	require.ErrorContains(t, err, `parse mount of /x: bad pagesize "lots"`)
	require.Equal(t, int64(2<<20), parseDefaultHugepageSize(strings.NewReader("HugePages_Total: 0\nHugepagesize:       2048 kB\n")))
}

// Subscribers hear the shared set whenever dedicated cores come or go,
// and not for grants without dedicated cores.
func TestSubscribeSharedSet(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-3")
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	p := newPool(t, Config{SysfsRoot: s.root, HugepageMounts: map[int64]string{}, ReservedSystemCPUs: "0"}, st)
	var heard [][]int
	cancel := p.Subscribe(func(shared []int) { heard = append(heard, shared) })
	_, err := p.Allocate(ctx, Request{Owner: "a", DedicatedCPUs: 2})
	require.NoError(t, err)
	_, err = p.Allocate(ctx, Request{Owner: "b"})
	require.NoError(t, err)
	require.NoError(t, p.Release(ctx, "b"))
	require.NoError(t, p.Release(ctx, "a"))
	require.Equal(t, [][]int{{3}, {1, 2, 3}}, heard)
	cancel()
	_, err = p.Allocate(ctx, Request{Owner: "c", DedicatedCPUs: 1})
	require.NoError(t, err)
	require.Len(t, heard, 2)
}
