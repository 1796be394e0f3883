package store

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
)

// The store's metrics: each committed write transaction is one
// observation of the commit histogram (a failed one none), and the size
// gauge is that of the SQLite file and its write-ahead log at the scrape.
func TestMetrics(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edge.db")
	s := openStore(t, path)
	reg := prometheus.NewRegistry()
	require.NoError(t, s.Register(reg))
	require.Error(t, s.Register(reg), "registering twice is an error, returned")

	gather := func() (commits uint64, size float64) {
		t.Helper()
		mfs, err := reg.Gather()
		require.NoError(t, err)
		for _, mf := range mfs {
			switch mf.GetName() {
			case "tether_edge_store_commit_seconds":
				commits = mf.GetMetric()[0].GetHistogram().GetSampleCount()
			case "tether_edge_store_size_bytes":
				size = mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		return commits, size
	}
	onDisk := func() float64 {
		t.Helper()
		var total int64
		for _, p := range []string{path, path + "-wal"} {
			fi, err := os.Stat(p)
			if err == nil {
				total += fi.Size()
			}
		}
		return float64(total)
	}
	before, _ := gather()
	big := strings.Repeat("x", 256<<10)
	o := nodeObject("edge-1", "1")
	o.Data = []byte(`{"metadata":{"name":"edge-1"},"data":"` + big + `"}`)
	require.NoError(t, s.Apply(t.Context(), []Change{upsert(o)}))
	require.NoError(t, s.Apply(t.Context(), []Change{upsert(nodeObject("edge-2", "1"))}))
	commits, size := gather()
	require.Equal(t, before+2, commits, "one observation per committed write")
	require.Equal(t, onDisk(), size)
	require.Greater(t, size, float64(256<<10), "the object written is on disk")

	// A batch the store refuses commits nothing.
	require.Error(t, s.Apply(t.Context(), []Change{{Op: 99, Object: nodeObject("edge-3", "1")}}))
	commits, _ = gather()
	require.Equal(t, before+2, commits)
}
