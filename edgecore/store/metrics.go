package store

import (
	"fmt"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the store's own: its size on disk and how long commits
// take. They exist from Open on; Register exposes them.
type metrics struct {
	commit prometheus.Histogram
	size   prometheus.GaugeFunc
}

func newMetrics(path string) metrics {
	return metrics{
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tether_edge_store_commit_seconds",
			Help:    "Time to commit a write transaction of the edge store, its fsync included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		size: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tether_edge_store_size_bytes",
			Help: "Size of the edge store's SQLite file and its write-ahead log.",
		}, func() float64 { return float64(fileSize(path) + fileSize(path+"-wal")) }),
	}
}

// fileSize is the size of the file at path; 0 when there is none (a
// write-ahead log checkpointed away) or it cannot be read.
func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// Register registers the store's metrics with reg: the commit latency
// histogram and the size of its files, read at each scrape.
func (s *Store) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{s.metrics.commit, s.metrics.size} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("register store metrics: %w", err)
		}
	}
	return nil
}

// observeCommit records a commit that began at start.
func (m metrics) observeCommit(start time.Time) {
	if m.commit != nil {
		m.commit.Observe(time.Since(start).Seconds())
	}
}
