package resources

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/store"
)

// BenchmarkAllocateRelease is the pool's share of a VM's start and stop:
// Allocate then Release of 2 dedicated cores, 64 MiB of 2 MiB hugepages
// and one VF (bound and restored on the synthetic sysfs tree), on a real
// SQLite file. BenchmarkClaimReleaseBaseline claims and releases the same
// rows with the store alone: the difference is the pool's planning and
// the sysfs writes.
func BenchmarkAllocateRelease(b *testing.B) {
	p, _ := benchPool(b)
	ctx := context.Background()
	req := Request{Owner: "vm", DedicatedCPUs: 2, HugepageSize: Hugepage2Mi, HugepageBytes: 64 << 20, VFs: map[string]int{"a": 1}}
	for b.Loop() {
		if _, err := p.Allocate(ctx, req); err != nil {
			b.Fatal(err)
		}
		if err := p.Release(ctx, "vm"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkClaimReleaseBaseline(b *testing.B) {
	_, st := benchPool(b)
	ctx := context.Background()
	a := st.Allocations()
	rows := []store.Allocation{
		{Kind: "cpu", Item: "1"}, {Kind: "cpu", Item: "2"},
		{Kind: "hugepages-2Mi", Item: "vm", Amount: 64 << 20},
		{Kind: "vf", Item: vfA0, Detail: []byte(`{"pool":"a","previousDriver":"iavf"}`)},
		{Kind: "grant", Item: "vm", Detail: make([]byte, 300)},
	}
	for b.Loop() {
		if err := a.Claim(ctx, "vm", rows, map[string]int64{"hugepages-2Mi": 1 << 30}); err != nil {
			b.Fatal(err)
		}
		if err := a.Release(ctx, "vm"); err != nil {
			b.Fatal(err)
		}
	}
}

func benchPool(b *testing.B) (*Pool, *store.Store) {
	s := newSynth(b, "0-3")
	s.pf(pfA, 8, "iavf", vfA0)
	s.pf(pfB, 8, "")
	s.hugepages(Hugepage2Mi, 512)
	st, err := store.Open(context.Background(), filepath.Join(b.TempDir(), "edge.db"), nil)
	require.NoError(b, err)
	b.Cleanup(func() { _ = st.Close() })
	cfg := sriovConfig(s)
	cfg.HugepageMounts = map[int64]string{Hugepage2Mi: b.TempDir()}
	p, err := New(cfg, st.Allocations(), nil)
	require.NoError(b, err)
	return p, st
}
