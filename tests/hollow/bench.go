package hollow

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/tunnel"
)

// ScaleConfig is one scale run: N hollow edges against one CloudCore
// process this package starts (and SIGKILLs for the reconnect storm).
type ScaleConfig struct {
	// Kube reaches the API server; KubeConfig is the same as a file, for
	// CloudCore. Required.
	Kube       *rest.Config
	KubeConfig string
	// CloudCore is the cloudcore binary. Required.
	CloudCore string
	// Dir holds CloudCore's log and the edges' stores (a tmpfs). Required.
	Dir string
	// Edges is how many hollow edges run. Required.
	Edges int
	// Prefix of the node names. Default "hollow".
	Prefix string
	// Workload is what each edge holds besides its Node; its Namespace
	// is required.
	Workload Workload
	// Rate is how many edges start per second; 0: all at once.
	Rate float64
	// LeaseDuration and StatusEvery are the edges' (nodestatus defaults).
	LeaseDuration, StatusEvery time.Duration
	// Backoff is the edges' reconnect back-off (tunnel's default).
	Backoff tunnel.Backoff
	// KeepAlive and DeadPeerTimeout are the edges' and CloudCore's
	// (tunnel's defaults, 5s and 15s).
	KeepAlive, DeadPeerTimeout time.Duration
	// Idle is how long the idle CPU is measured. Default 30s.
	Idle time.Duration
	// Timeout bounds each wait (connect, fan-out, storm). Default 10m.
	Timeout time.Duration
	// Hollowedge, when set, is the hollowedge command: the edges run in
	// child `hollowedge run` processes of at most PerProcess edges each
	// (Procs). Empty: they run in this process.
	Hollowedge string
	// PerProcess is the most edges one child process runs. Default
	// DefaultPerProcess.
	PerProcess int
	// Nice and GOMAXPROCS tune the child processes (ProcsConfig): the
	// simulator's cost, not CloudCore's.
	Nice, GOMAXPROCS int
	// CloudCoreArgs are more flags for CloudCore.
	CloudCoreArgs []string
	// DumpGoroutines ends the run with SIGQUIT to CloudCore, whose
	// runtime writes every goroutine's stack to its log (kept as
	// GoroutineDump in the result).
	DumpGoroutines bool
	// ProfileDir, when set, runs CloudCore with --pprof and receives its
	// heap and goroutine profiles before any edge (before-heap.pprof,
	// before-goroutine.pprof) and at the end of the idle window
	// (connected-heap.pprof, connected-goroutine.pprof): what the edges
	// hold is the difference (go tool pprof -diff_base).
	ProfileDir string
	// Logger gets progress lines and the edges' warnings.
	Logger *slog.Logger
}

// ScaleResult are the figures of a scale run.
type ScaleResult struct {
	Edges, Objects int
	// Connect is from an edge's start to its first session, Reconciled to
	// the end of that session's first reconcile; ConnectAll from the
	// first edge's start to the last one's reconcile.
	Connect, Reconciled []time.Duration
	ConnectAll          time.Duration
	// CloudCore before any edge (with the workload in its caches) and
	// with every edge connected and idle.
	Before, Connected Usage
	// IdleCPU is CloudCore's CPU time per second over Idle, while every
	// edge is connected; IdleWait how long a second its threads waited
	// for a CPU meanwhile (summed over threads: on a shared machine, how
	// starved it was); HollowIdleCPU the CPU time per second of the
	// processes that run the edges.
	IdleCPU, IdleWait, HollowIdleCPU float64
	// IdleRequests are the API server's requests (all clients) over the
	// idle window.
	IdleRequests APISample
	// LeaseAges are now minus renewTime of every edge's Lease, at the end
	// of the idle window; LeaseRenew is the renew interval.
	LeaseAges  []time.Duration
	LeaseRenew time.Duration
	// FanOut is, per edge, from the ConfigMap update's request to the
	// commit in its store.
	FanOut []time.Duration
	// StormReady is from SIGKILL to the new CloudCore's readiness;
	// StormLast from SIGKILL to the last edge reconnected and reconciled;
	// StormSpread, from SIGKILL, the reconcile ends of all edges.
	StormReady, StormLast time.Duration
	StormSpread           []time.Duration
	// StormRequests are the API server's requests by verb from the new
	// CloudCore's readiness to the last edge reconciled (all clients: the
	// edges' lease and status writes included).
	StormRequests APISample
	// After is CloudCore's usage once the storm is over.
	After Usage
	// Processes is how many processes ran the edges.
	Processes int
	// HollowRSS is the resident memory of the processes that run the
	// edges, with every edge connected (what the hollow edges cost, not
	// CloudCore); HollowFDs their open files then, HollowMaxFDs the most
	// of any one process.
	HollowRSS               float64
	HollowFDs, HollowMaxFDs int
	// GoroutineDump is CloudCore's goroutine dump (DumpGoroutines).
	GoroutineDump []byte
}

// Usage is what CloudCore's /metrics says of the process.
type Usage struct {
	RSS, HeapInuse float64 // bytes
	Goroutines     float64
	CPU            float64 // seconds since start
}

func usageOf(ctx context.Context, cc *CloudCore) (Usage, error) {
	m, err := cc.Metrics(ctx)
	if err != nil {
		return Usage{}, err
	}
	var u Usage
	var errs []error
	read := func(name string, into *float64) {
		v, err := m.Sum(name, nil)
		errs = append(errs, err)
		*into = v
	}
	read("process_resident_memory_bytes", &u.RSS)
	read("go_memstats_heap_inuse_bytes", &u.HeapInuse)
	read("go_goroutines", &u.Goroutines)
	read("process_cpu_seconds_total", &u.CPU)
	return u, errors.Join(errs...)
}

// Scale runs the scenario of docs/benchmarks.md ("Hollow edges"):
// onboard, connect, idle, fan-out, reconnect storm.
func Scale(ctx context.Context, cfg ScaleConfig) (*ScaleResult, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "hollow"
	}
	if cfg.Idle <= 0 {
		cfg.Idle = 30 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	lease := cfg.LeaseDuration
	if lease <= 0 {
		lease = 40 * time.Second
	}
	log := cfg.Logger
	res := &ScaleResult{Edges: cfg.Edges, LeaseRenew: lease / 4}
	nodes := make([]string, cfg.Edges)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("%s-%05d", cfg.Prefix, i)
	}
	begin := time.Now()
	if err := cfg.Workload.Create(ctx, cfg.Kube, nodes); err != nil {
		return nil, err
	}
	log.Info("workload created", "pods", cfg.Edges*cfg.Workload.withDefaults().PodsPerEdge, "took", time.Since(begin).Round(time.Millisecond))
	begin = time.Now()
	ids, ca, err := Onboard(ctx, cfg.Kube, nodes, OnboardConfig{Logger: log})
	if err != nil {
		return nil, err
	}
	log.Info("edges onboarded", "edges", len(ids), "took", time.Since(begin).Round(time.Millisecond))
	ccArgs := slices.Clone(cfg.CloudCoreArgs)
	if cfg.ProfileDir != "" {
		ccArgs = append(ccArgs, "--pprof")
	}
	if cfg.KeepAlive > 0 {
		ccArgs = append(ccArgs, "--keepalive", cfg.KeepAlive.String())
	}
	if cfg.DeadPeerTimeout > 0 {
		ccArgs = append(ccArgs, "--dead-peer-timeout", cfg.DeadPeerTimeout.String())
	}
	cc, err := StartCloudCore(ctx, CloudCoreConfig{Binary: cfg.CloudCore, KubeConfig: cfg.KubeConfig, Dir: cfg.Dir, Args: ccArgs})
	if err != nil {
		return nil, err
	}
	defer cc.Stop()
	// Let the start-up garbage go before the baseline.
	if err := pause(ctx, 10*time.Second); err != nil {
		return nil, err
	}
	if res.Before, err = usageOf(ctx, cc); err != nil {
		return nil, err
	}
	if err := profiles(ctx, cc, cfg.ProfileDir, "before"); err != nil {
		return nil, err
	}
	log.Info("cloudcore ready", "rss_mib", res.Before.RSS/(1<<20), "goroutines", res.Before.Goroutines)

	dataRoot := filepath.Join(cfg.Dir, "edges")
	defer os.RemoveAll(dataRoot)
	edges, stopEdges, err := startEdges(ctx, cfg, cc, ca, ids, dataRoot)
	if err != nil {
		return nil, err
	}
	defer stopEdges()

	// Connect.
	start := time.Now()
	if err := waitFor(ctx, cfg.Timeout, log, "connect", func() (bool, string, error) {
		c, err := edges.Report(ctx, Query{})
		return c.Reconciled == cfg.Edges, fmt.Sprintf("started %d connected %d reconciled %d", c.Started, c.Connected, c.Reconciled), err
	}); err != nil {
		return res, err
	}
	res.ConnectAll = time.Since(start)
	rep, err := edges.Report(ctx, Query{Connect: true})
	if err != nil {
		return res, err
	}
	res.Connect, res.Reconciled, res.Processes = rep.Connect, rep.FirstReconcile, rep.Processes
	log.Info("all connected", "took", res.ConnectAll.Round(time.Millisecond))

	// Idle.
	if err := pause(ctx, 10*time.Second); err != nil {
		return res, err
	}
	u0, err := usageOf(ctx, cc)
	if err != nil {
		return res, err
	}
	w0, err := runDelay(cc.Pid())
	if err != nil {
		return res, err
	}
	h0, err := edges.Report(ctx, Query{Self: true})
	if err != nil {
		return res, err
	}
	r0, err := SampleAPI(ctx, cfg.Kube)
	if err != nil {
		return res, err
	}
	idleStart := time.Now()
	if err := pause(ctx, cfg.Idle); err != nil {
		return res, err
	}
	if res.Connected, err = usageOf(ctx, cc); err != nil {
		return res, err
	}
	r1, err := SampleAPI(ctx, cfg.Kube)
	if err != nil {
		return res, err
	}
	if err := profiles(ctx, cc, cfg.ProfileDir, "connected"); err != nil {
		return res, err
	}
	w1, err := runDelay(cc.Pid())
	if err != nil {
		return res, err
	}
	res.IdleCPU = (res.Connected.CPU - u0.CPU) / cfg.Idle.Seconds()
	res.IdleWait = (w1 - w0) / cfg.Idle.Seconds()
	res.IdleRequests = r1.Sub(r0)
	if res.LeaseAges, _, err = LeaseAges(ctx, cfg.Kube, nodes); err != nil {
		return res, err
	}
	snap, err := edges.Report(ctx, Query{Objects: true, Self: true})
	if err != nil {
		return res, err
	}
	res.Objects = snap.Objects
	res.HollowRSS, res.HollowFDs, res.HollowMaxFDs = snap.RSS, snap.FDs, snap.MaxFDs
	// The window also holds the objects' count (one query per store).
	res.HollowIdleCPU = (snap.CPU - h0.CPU) / time.Since(idleStart).Seconds()
	log.Info("idle measured", "cpu", res.IdleCPU, "rss_mib", res.Connected.RSS/(1<<20), "objects", snap.Objects)

	// Fan-out.
	changed, err := cfg.Workload.Bump(ctx, cfg.Kube, 1)
	if err != nil {
		return res, err
	}
	if err := waitFor(ctx, cfg.Timeout, log, "fan-out", func() (bool, string, error) {
		r, err := edges.Report(ctx, Query{WatchedSince: changed})
		if err == nil && r.WatchedMissing == 0 {
			res.FanOut = r.Watched
		}
		return err == nil && r.WatchedMissing == 0, fmt.Sprintf("%d stores without the change", r.WatchedMissing), err
	}); err != nil {
		return res, err
	}
	log.Info("fan-out done", "p99", Percentile(res.FanOut, 99))

	// Reconnect storm.
	killed := time.Now()
	cc.Kill()
	if err := cc.Start(ctx); err != nil {
		return res, err
	}
	ready := time.Now()
	res.StormReady = ready.Sub(killed)
	s0, err := SampleAPI(ctx, cfg.Kube)
	if err != nil {
		return res, err
	}
	// Counted from the kill, not from readiness: the new CloudCore serves
	// sessions before the run sees it ready (its readiness is polled), and
	// an edge that reconciled in between is on the new CloudCore (a live
	// session that reconciled after the kill) but would never count.
	if err := waitFor(ctx, cfg.Timeout, log, "storm", func() (bool, string, error) {
		r, err := edges.Report(ctx, Query{ReconciledSince: killed})
		if err == nil && r.NotReconnected == 0 {
			res.StormSpread = r.Reconnected
		}
		return err == nil && r.NotReconnected == 0, fmt.Sprintf("%d edges not reconciled", r.NotReconnected), err
	}); err != nil {
		return res, err
	}
	res.StormLast = Percentile(res.StormSpread, 100)
	s1, err := SampleAPI(ctx, cfg.Kube)
	if err != nil {
		return res, err
	}
	res.StormRequests = s1.Sub(s0)
	if err := pause(ctx, 10*time.Second); err != nil {
		return res, err
	}
	if res.After, err = usageOf(ctx, cc); err != nil {
		return res, err
	}
	log.Info("storm done", "last", res.StormLast.Round(time.Millisecond))
	if cfg.DumpGoroutines {
		cc.Quit()
		if res.GoroutineDump, err = os.ReadFile(cc.LogPath()); err != nil {
			return res, fmt.Errorf("read the goroutine dump: %w", err)
		}
	}
	return res, nil
}

// profiles writes CloudCore's heap and goroutine profiles into dir as
// <stage>-heap.pprof and <stage>-goroutine.pprof; nothing when dir is "".
func profiles(ctx context.Context, cc *CloudCore, dir, stage string) error {
	if dir == "" {
		return nil
	}
	for _, name := range []string{"heap", "goroutine"} {
		if err := cc.Profile(ctx, name, filepath.Join(dir, stage+"-"+name+".pprof")); err != nil {
			return err
		}
	}
	return nil
}

// pause waits d or until ctx ends: a measurement window, not a
// synchronisation.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// waitFor polls cond every 100ms until it holds, logging its progress
// every 10s, or fails after timeout.
func waitFor(ctx context.Context, timeout time.Duration, log *slog.Logger, what string, cond func() (bool, string, error)) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	lastLog := time.Now()
	for {
		ok, state, err := cond()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not done after %s: %s", what, timeout, state)
		}
		if time.Since(lastLog) > 10*time.Second {
			log.Info("waiting", "for", what, "state", state)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// selfRSS is this process's resident set in bytes (0 if unreadable).
func selfRSS() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 64)
			if err == nil {
				return kb * 1024
			}
		}
	}
	return 0
}

// startEdges starts the run's edges, in this process or in child
// processes (cfg.Hollowedge), and returns them and how to stop them.
func startEdges(ctx context.Context, cfg ScaleConfig, cc *CloudCore, ca *x509.Certificate, ids []Identity, dataRoot string) (reporter, func(), error) {
	w := cfg.Workload.withDefaults()
	if cfg.Hollowedge != "" {
		if err := os.MkdirAll(dataRoot, 0o700); err != nil {
			return nil, nil, fmt.Errorf("create data root: %w", err)
		}
		procs, err := StartProcs(ctx, ProcsConfig{
			Binary: cfg.Hollowedge, Dir: dataRoot, Cloud: []string{cc.Addr()}, CA: ca, PerProcess: cfg.PerProcess,
			Rate: cfg.Rate, Namespace: w.Namespace, ConfigMap: w.ConfigMap,
			LeaseDuration: cfg.LeaseDuration, StatusEvery: cfg.StatusEvery, Backoff: cfg.Backoff,
			KeepAlive: cfg.KeepAlive, DeadPeerTimeout: cfg.DeadPeerTimeout, Nice: cfg.Nice, GOMAXPROCS: cfg.GOMAXPROCS,
			Logger: cfg.Logger,
		}, ids)
		if err != nil {
			return nil, nil, err
		}
		return procs, func() {
			if err := procs.Stop(); err != nil {
				cfg.Logger.Warn("hollow processes failed", "err", err)
			}
		}, nil
	}
	if _, err := RaiseFileLimit(len(ids)); err != nil {
		return nil, nil, err
	}
	fleet, err := New(Config{
		Cloud: []string{cc.Addr()}, CA: ca, DataRoot: dataRoot, Rate: cfg.Rate,
		LeaseDuration: cfg.LeaseDuration, StatusEvery: cfg.StatusEvery, Backoff: cfg.Backoff,
		KeepAlive: cfg.KeepAlive, DeadPeerTimeout: cfg.DeadPeerTimeout, Watch: w.Key(), Logger: cfg.Logger,
	}, ids)
	if err != nil {
		return nil, nil, err
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- fleet.Run(runCtx) }()
	return fleet, func() {
		stop()
		if err := <-done; err != nil {
			cfg.Logger.Warn("hollow fleet failed", "err", err)
		}
	}, nil
}
