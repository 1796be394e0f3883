package hollow

import (
	"context"
	"fmt"
	"os"
	"time"
)

// Query says what a Report is to carry besides the counts, which it
// always carries. The zero Query asks for the counts only: cheap enough
// to poll every 100 ms at 10,000 edges.
type Query struct {
	// Objects counts the rows of every started edge's store (one query
	// per store).
	Objects bool `json:"objects,omitempty"`
	// Connect asks for ConnectLatencies.
	Connect bool `json:"connect,omitempty"`
	// WatchedSince, when not zero, asks for WatchedSince of it.
	WatchedSince time.Time `json:"watched_since,omitzero"`
	// ReconciledSince, when not zero, asks for ReconciledSince of it.
	ReconciledSince time.Time `json:"reconciled_since,omitzero"`
	// Self asks for the resident memory and open files of the process
	// the edges run in.
	Self bool `json:"self,omitempty"`
}

// Report is what a set of hollow edges says of itself, as Query asked. It
// travels as JSON from a child `hollowedge run` to the scale run (Procs),
// and the reports of several sets add up (Add).
type Report struct {
	// Snapshot: the counts, and the objects held when asked.
	Snapshot
	// Connect and FirstReconcile are ConnectLatencies.
	Connect        []time.Duration `json:"connect,omitempty"`
	FirstReconcile []time.Duration `json:"first_reconcile,omitempty"`
	// Watched and WatchedMissing are WatchedSince.
	Watched        []time.Duration `json:"watched,omitempty"`
	WatchedMissing int             `json:"watched_missing,omitempty"`
	// Reconnected and NotReconnected are ReconciledSince.
	Reconnected    []time.Duration `json:"reconnected,omitempty"`
	NotReconnected int             `json:"not_reconnected,omitempty"`
	// RSS (bytes), CPU (seconds used so far) and FDs of the processes
	// the edges run in, summed; MaxFDs the most open files of any one of
	// them.
	RSS    float64 `json:"rss,omitempty"`
	CPU    float64 `json:"cpu,omitempty"`
	FDs    int     `json:"fds,omitempty"`
	MaxFDs int     `json:"max_fds,omitempty"`
	// Processes is how many processes answered (1 for a Fleet).
	Processes int `json:"processes"`
}

// Add adds o's figures to r's: counts and sums add, latencies append.
func (r *Report) Add(o Report) {
	r.Started += o.Started
	r.Connected += o.Connected
	r.Reconciled += o.Reconciled
	r.Objects += o.Objects
	r.Connect = append(r.Connect, o.Connect...)
	r.FirstReconcile = append(r.FirstReconcile, o.FirstReconcile...)
	r.Watched = append(r.Watched, o.Watched...)
	r.WatchedMissing += o.WatchedMissing
	r.Reconnected = append(r.Reconnected, o.Reconnected...)
	r.NotReconnected += o.NotReconnected
	r.RSS += o.RSS
	r.CPU += o.CPU
	r.FDs += o.FDs
	r.MaxFDs = max(r.MaxFDs, o.MaxFDs)
	r.Processes += o.Processes
}

// reporter is a set of hollow edges a scale run measures: a Fleet in this
// process, or Procs in child processes.
type reporter interface {
	Report(ctx context.Context, q Query) (Report, error)
}

// Report answers q for the fleet's edges (in this process).
func (f *Fleet) Report(ctx context.Context, q Query) (Report, error) {
	r := Report{Snapshot: f.Counts(), Processes: 1}
	if q.Objects {
		s, err := f.Snapshot(ctx)
		if err != nil {
			return r, err
		}
		r.Objects = s.Objects
	}
	if q.Connect {
		r.Connect, r.FirstReconcile = f.ConnectLatencies()
	}
	if !q.WatchedSince.IsZero() {
		r.Watched, r.WatchedMissing = f.WatchedSince(q.WatchedSince)
	}
	if !q.ReconciledSince.IsZero() {
		r.Reconnected, r.NotReconnected = f.ReconciledSince(q.ReconciledSince)
	}
	if q.Self {
		r.RSS = selfRSS()
		cpu, err := cpuSeconds("self")
		if err != nil {
			return r, err
		}
		r.CPU = cpu
		fds, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			return r, fmt.Errorf("count open files: %w", err)
		}
		r.FDs, r.MaxFDs = len(fds), len(fds)
	}
	return r, nil
}
