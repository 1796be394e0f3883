// Package hollow runs many hollow edges in a process for scale tests, as
// KubeEdge's edgemark does: each is a whole EdgeCore (edgecore/app) with
// its own certificate, tunnel client, syncer, SQLite store and node status
// reporter (registration, lease and status at the configured interval),
// and no pod runtime: no CRI endpoint, so the Node is Ready as for a node
// that only syncs (nodestatus.Config.RequireRuntime false) and its pods
// stay Pending. Onboard whitelists the edges from the cluster CA Secret,
// and CloudCore runs the shipped cloudcore command as a separate process
// so that its memory and CPU are its own. A scale run past one process's
// open file limit spreads the edges over child `hollowedge run` processes
// (Procs, procs.go) whose reports add up (Report, report.go).
// tests/cmd/hollowedge and the tests in this package drive them.
//
// What a hollow edge reports comes from the real code, observed without
// changing it: the store is wrapped (edgecore/app.Config.WrapStore) to
// timestamp commits, and the edge's logger hears the tunnel's and the
// syncer's constant messages for a session opened, a session ended and a
// reconcile finished (signals.go).
//
// Test support only: nothing in cloudcore/, edgecore/, tunnel/ or common/
// may import it.
package hollow

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/common/objsync"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tunnel"
)

// Config configures a Fleet; zero values mean the defaults beside them.
type Config struct {
	// Cloud are the CloudCore addresses every edge is given, tried in
	// order ("quic://127.0.0.1:10000"). Required.
	Cloud []string
	// CA is the cluster CA (Onboard returns it). Required.
	CA *x509.Certificate
	// DataRoot holds one directory per edge with its store; a tmpfs
	// (/dev/shm) keeps thousands of them off the disk. Required.
	DataRoot string
	// Rate is how many edges start per second; 0 starts all at once.
	Rate float64
	// LeaseDuration is each edge's lease, renewed every quarter of it;
	// StatusEvery how often it publishes its Node status. Defaults those
	// of nodestatus (40s and 1m).
	LeaseDuration, StatusEvery time.Duration
	// KeepAlive and DeadPeerTimeout tune each tunnel. Defaults tunnel's.
	KeepAlive, DeadPeerTimeout time.Duration
	// Backoff bounds reconnect delays. Default tunnel's (500ms to 8s,
	// jittered).
	Backoff tunnel.Backoff
	// Watch is the key whose commits each edge timestamps (the shared
	// ConfigMap), for fan-out latencies. Zero: none.
	Watch objsync.Key
	// Logger receives the edges' warnings and errors, each with its
	// node. Nil discards them.
	Logger *slog.Logger
}

// maxOpening is how many edges of a fleet open their stores at once.
const maxOpening = 8

// Fleet is a set of hollow edges.
type Fleet struct {
	cfg   Config
	edges []*Edge
}

// New returns a fleet of one edge per identity; Run starts them.
func New(cfg Config, ids []Identity) (*Fleet, error) {
	switch {
	case len(cfg.Cloud) == 0:
		return nil, errors.New("hollow: at least one cloud address is required")
	case cfg.CA == nil:
		return nil, errors.New("hollow: the cluster CA is required")
	case cfg.DataRoot == "":
		return nil, errors.New("hollow: a data root is required")
	case cfg.Rate < 0:
		return nil, fmt.Errorf("hollow: negative start rate %v", cfg.Rate)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	f := &Fleet{cfg: cfg, edges: make([]*Edge, len(ids))}
	for i, id := range ids {
		f.edges[i] = &Edge{id: id}
	}
	return f, nil
}

// Edges returns the edges, in the order of the identities.
func (f *Fleet) Edges() []*Edge { return f.edges }

// Run starts the edges at the configured rate, runs them until ctx ends,
// and closes their stores. An edge that cannot start stops the fleet.
func (f *Fleet) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	var tick *time.Ticker
	if f.cfg.Rate > 0 {
		tick = time.NewTicker(time.Duration(float64(time.Second) / f.cfg.Rate))
		defer tick.Stop()
	}
	var (
		mu     sync.Mutex
		opened []*edgeapp.App
	)
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, a := range opened {
			_ = a.Close()
		}
	}()
	// Edges open concurrently, a few at a time, so that the start rate
	// holds when one open (a store, its migrations, host facts) takes
	// longer than the interval between starts on a loaded machine.
	opening := make(chan struct{}, maxOpening)
	var startMu sync.Mutex
	var startErr error
	func() {
		for i, e := range f.edges {
			if tick != nil && i > 0 {
				select {
				case <-gctx.Done():
					return
				case <-tick.C:
				}
			}
			select {
			case <-gctx.Done():
				return
			case opening <- struct{}{}:
			}
			g.Go(func() error {
				a, err := f.open(gctx, e)
				<-opening
				if err != nil {
					startMu.Lock()
					startErr = cmp.Or(startErr, err)
					startMu.Unlock()
					cancel()
					return nil
				}
				mu.Lock()
				opened = append(opened, a)
				mu.Unlock()
				return a.Run(gctx)
			})
		}
	}()
	err := g.Wait()
	if startErr != nil {
		return startErr
	}
	return err
}

// open builds edge e's EdgeCore and marks it started.
func (f *Fleet) open(ctx context.Context, e *Edge) (*edgeapp.App, error) {
	dir := filepath.Join(f.cfg.DataRoot, e.id.Node)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data directory of %s: %w", e.id.Node, err)
	}
	e.watch = f.cfg.Watch
	logger := slog.New(signals{e: e, next: f.cfg.Logger.Handler()}).With("edge", e.id.Node)
	a, err := edgeapp.New(ctx, edgeapp.Config{
		Cloud: f.cfg.Cloud, Node: e.id.Node, Certificate: e.id.Cert, CA: f.cfg.CA,
		IdentityDir: dir, DataDir: dir,
		KeepAlive: f.cfg.KeepAlive, DeadPeerTimeout: f.cfg.DeadPeerTimeout, Backoff: f.cfg.Backoff,
		NodeStatus: nodestatus.Config{
			LeaseDuration: f.cfg.LeaseDuration, StatusEvery: f.cfg.StatusEvery,
			// The same capacity on every edge, whatever this host has.
			MemoryBytes: 4 << 30,
		},
		WrapStore: func(st *store.Store) syncer.Store { return observed{Store: st, e: e} },
		Logger:    logger,
	})
	if err != nil {
		return nil, fmt.Errorf("start hollow edge %s: %w", e.id.Node, err)
	}
	e.mu.Lock()
	e.st, e.started = a.Store(), time.Now()
	e.mu.Unlock()
	return a, nil
}

// Snapshot is the fleet's state at one instant.
type Snapshot struct {
	// Started edges have their EdgeCore running; Connected ones have a
	// live session now; Reconciled ones finished a reconcile in their
	// current session.
	Started, Connected, Reconciled int
	// Objects is the sum of the objects the started edges' stores hold.
	Objects int
}

// Snapshot counts the edges' states and the objects their stores hold.
func (f *Fleet) Snapshot(ctx context.Context) (Snapshot, error) {
	s := f.Counts()
	for _, e := range f.edges {
		st := e.State()
		if st.Store == nil {
			continue
		}
		n, err := st.Store.Count(ctx)
		if err != nil {
			return s, fmt.Errorf("count the objects of %s: %w", e.id.Node, err)
		}
		s.Objects += n
	}
	return s, nil
}

// Counts counts the edges' states without reading their stores (cheap
// enough to poll at 10,000 edges).
func (f *Fleet) Counts() Snapshot {
	var s Snapshot
	for _, e := range f.edges {
		st := e.State()
		if st.Store == nil {
			continue
		}
		s.Started++
		if st.Connected {
			s.Connected++
		}
		if st.Reconciled {
			s.Reconciled++
		}
	}
	return s
}

// ConnectLatencies returns, for every edge that connected, the time from
// its start to its first session and to the end of that session's first
// reconcile.
func (f *Fleet) ConnectLatencies() (connect, reconciled []time.Duration) {
	for _, e := range f.edges {
		st := e.State()
		if !st.FirstConnected.IsZero() {
			connect = append(connect, st.FirstConnected.Sub(st.Started))
		}
		if !st.FirstReconciled.IsZero() {
			reconciled = append(reconciled, st.FirstReconciled.Sub(st.Started))
		}
	}
	return connect, reconciled
}

// WatchedSince returns, for each edge whose store committed the watched
// key after t, how long after t that was, and how many edges did not.
func (f *Fleet) WatchedSince(t time.Time) (latencies []time.Duration, missing int) {
	for _, e := range f.edges {
		if at := e.State().Watched; at.After(t) {
			latencies = append(latencies, at.Sub(t))
		} else {
			missing++
		}
	}
	return latencies, missing
}

// ReconciledSince returns, for each edge whose last reconcile finished
// after t and which is connected now, how long after t that was, and how
// many edges are not so.
func (f *Fleet) ReconciledSince(t time.Time) (latencies []time.Duration, missing int) {
	for _, e := range f.edges {
		st := e.State()
		if st.Connected && st.Reconciled && st.LastReconciled.After(t) {
			latencies = append(latencies, st.LastReconciled.Sub(t))
		} else {
			missing++
		}
	}
	return latencies, missing
}
