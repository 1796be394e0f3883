package store

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
)

// benchObject returns an object of about 1 KiB of JSON.
func benchObject(i, version int) Object {
	name := fmt.Sprintf("obj-%05d", i)
	return Object{
		Resource: message.Resource{
			Version:   "v1",
			Kind:      "ConfigMap",
			Namespace: fmt.Sprintf("ns-%d", i%20),
			Name:      name,
			UID:       fmt.Sprintf("00000000-0000-0000-0000-%012d", i),
		},
		Version: strconv.Itoa(version),
		Data: fmt.Appendf(nil, `{"metadata":{"name":%q,"resourceVersion":"%d"},"data":{"v":%q}}`,
			name, version, strings.Repeat("x", 950)),
	}
}

// BenchmarkApplyBatch measures one durable Apply (one fsync'd commit) of a
// batch of upserts that replace existing objects with a new version.
func BenchmarkApplyBatch(b *testing.B) {
	for _, size := range []int{1, 10, 100} {
		b.Run(fmt.Sprintf("size=%d", size), func(b *testing.B) {
			ctx := b.Context()
			s := openStore(b, filepath.Join(b.TempDir(), "bench.db"))
			// Two versions of the same objects, applied in turn.
			var versions [2][]Change
			for v := range versions {
				for i := range size {
					versions[v] = append(versions[v], upsert(benchObject(i, v+1)))
				}
			}
			require.NoError(b, s.Apply(ctx, versions[1]))
			b.SetBytes(int64(size * len(versions[0][0].Object.Data)))
			iterations := 0
			for b.Loop() {
				if err := s.Apply(ctx, versions[iterations%2]); err != nil {
					b.Fatal(err)
				}
				iterations++
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(iterations*size), "ns/object")
		})
	}
}

// BenchmarkInventory10k measures reading the inventory of 10,000 objects.
func BenchmarkInventory10k(b *testing.B) {
	const n, batch = 10000, 1000
	ctx := b.Context()
	s := openStore(b, filepath.Join(b.TempDir(), "bench.db"))
	for start := 0; start < n; start += batch {
		changes := make([]Change, 0, batch)
		for i := start; i < start+batch; i++ {
			changes = append(changes, upsert(benchObject(i, 1)))
		}
		require.NoError(b, s.Apply(ctx, changes))
	}
	for b.Loop() {
		inv, err := s.Inventory(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if len(inv) != n {
			b.Fatalf("inventory has %d entries, want %d", len(inv), n)
		}
	}
}
