// Command hollowedge runs many hollow edges (tests/hollow) in one process,
// as KubeEdge's edgemark does: each a whole EdgeCore with its own
// certificate, tunnel, syncer, SQLite store and node status, no pod
// runtime. It is test tooling: it whitelists its nodes straight from the
// cluster CA Secret. This file only parses flags and wires the package.
//
//	hollowedge run --kubeconfig K --cloud quic://10.0.0.1:10000 --edges 500 --rate 50
//	    whitelists and runs the edges against running CloudCores until
//	    Ctrl-C, printing sessions, objects held and connect latencies;
//	hollowedge scale --edges 1000
//	    starts etcd and kube-apiserver (tests/controlplane) and the
//	    cloudcore command as a child process, and measures CloudCore's
//	    memory, idle CPU and goroutines, the fan-out of one ConfigMap
//	    change and a reconnect storm (docs/benchmarks.md, "Hollow edges").
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/spf13/cobra"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/hollow"
	"github.com/tetheredge/tether/tunnel"
)

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "hollowedge:", err)
		os.Exit(1)
	}
}

type common struct {
	edges                  int
	rate                   float64
	prefix, namespace      string
	configMap              string
	podsPerEdge            int
	lease, status          time.Duration
	keepAlive, deadPeer    time.Duration
	backoffMin, backoffMax time.Duration
	dataRoot               string
}

func (c *common) flags(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.IntVar(&c.edges, "edges", 100, "number of hollow edges")
	fl.Float64Var(&c.rate, "rate", 0, "edges started per second (0: all at once)")
	fl.StringVar(&c.prefix, "prefix", "hollow", "prefix of the node names (<prefix>-00000, ...)")
	fl.StringVar(&c.namespace, "namespace", "hollow", "namespace of the pods and the shared ConfigMap (created if absent)")
	fl.StringVar(&c.configMap, "configmap", "shared", "name of the ConfigMap shared by all edges, in --namespace")
	fl.IntVar(&c.podsPerEdge, "pods-per-edge", 2, "pods bound to each edge, each mounting the shared ConfigMap")
	fl.DurationVar(&c.lease, "lease-duration", 40*time.Second, "each edge's lease duration (renewed every quarter of it)")
	fl.DurationVar(&c.status, "status-every", time.Minute, "how often each edge publishes its Node status")
	fl.DurationVar(&c.keepAlive, "keepalive", 0, "each edge's tunnel keepalive (0: tunnel's default, 5s); scale gives CloudCore the same")
	fl.DurationVar(&c.deadPeer, "dead-peer-timeout", 0, "each edge's dead-peer timeout (0: tunnel's default, 15s); scale gives CloudCore the same")
	fl.DurationVar(&c.backoffMin, "backoff-min", 500*time.Millisecond, "first reconnect delay")
	fl.DurationVar(&c.backoffMax, "backoff-max", 8*time.Second, "longest reconnect delay")
	fl.StringVar(&c.dataRoot, "data-root", "/dev/shm", "directory (a tmpfs) under which a fresh directory holds the edges' stores")
}

func newRoot() *cobra.Command {
	root := &cobra.Command{Use: "hollowedge", Short: "Many hollow Tether edges in one process, for scale tests", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(newRun(), newScale(), newWriteCap())
	return root
}

func logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

type runFlags struct {
	kubeconfig   string
	cloud        []string
	identities   string
	reportSocket string
}

func newRun() *cobra.Command {
	var c common
	var r runFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "whitelist and run hollow edges against running CloudCores until interrupted",
		RunE: func(*cobra.Command, []string) error {
			if len(r.cloud) == 0 {
				return errors.New("--cloud is required")
			}
			ctx, stop := signalContext()
			defer stop()
			return run(ctx, c, r)
		},
	}
	c.flags(cmd)
	fl := cmd.Flags()
	fl.StringVar(&r.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (admin rights: it writes EdgeNodes, pods and ConfigMaps)")
	fl.StringSliceVar(&r.cloud, "cloud", nil, "CloudCore addresses every edge is given (quic://host:port or wss://host:port), tried in order")
	fl.StringVar(&r.identities, "identities", "", "run the edges of this identities file (written by hollowedge scale) instead of whitelisting --edges new ones: no kubeconfig, no workload")
	fl.StringVar(&r.reportSocket, "report-socket", "", "Unix socket to answer the fleet's reports on (hollowedge scale asks its child processes there)")
	return cmd
}

func run(ctx context.Context, c common, r runFlags) error {
	log := logger()
	w := hollow.Workload{Namespace: c.namespace, ConfigMap: c.configMap, PodsPerEdge: c.podsPerEdge}
	var ids []hollow.Identity
	var ca *x509.Certificate
	var err error
	if r.identities != "" {
		if ids, ca, err = hollow.ReadIdentities(r.identities); err != nil {
			return err
		}
	} else if ids, ca, err = whitelist(ctx, c, w, r.kubeconfig, log); err != nil {
		return err
	}
	limit, err := hollow.RaiseFileLimit(len(ids))
	if err != nil {
		return err
	}
	log.Info("hollow edges", "edges", len(ids), "open_file_limit", limit)
	dir, err := os.MkdirTemp(c.dataRoot, "hollowedge-")
	if err != nil {
		return fmt.Errorf("create data root: %w", err)
	}
	defer os.RemoveAll(dir)
	fleet, err := hollow.New(hollow.Config{
		Cloud: r.cloud, CA: ca, DataRoot: dir, Rate: c.rate, LeaseDuration: c.lease, StatusEvery: c.status,
		KeepAlive: c.keepAlive, DeadPeerTimeout: c.deadPeer,
		Backoff: tunnel.Backoff{Min: c.backoffMin, Max: c.backoffMax}, Watch: w.Key(), Logger: log,
	}, ids)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- fleet.Run(ctx) }()
	served := make(chan error, 1)
	if r.reportSocket != "" {
		go func() { served <- hollow.ServeReports(ctx, fleet, r.reportSocket) }()
	}
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			return err
		case err := <-served:
			cancel()
			return errors.Join(err, <-done)
		case <-tick.C:
			s, err := fleet.Snapshot(ctx)
			if err != nil {
				log.Warn("snapshot failed", "err", err)
				continue
			}
			connect, reconciled := fleet.ConnectLatencies()
			log.Info("fleet", "started", s.Started, "connected", s.Connected, "reconciled", s.Reconciled, "objects", s.Objects,
				"connect_p50", hollow.Percentile(connect, 50), "connect_p99", hollow.Percentile(connect, 99),
				"reconciled_p50", hollow.Percentile(reconciled, 50), "reconciled_p99", hollow.Percentile(reconciled, 99))
		}
	}
}

// whitelist creates the workload of --edges new edges and whitelists
// them.
func whitelist(ctx context.Context, c common, w hollow.Workload, kubeconfig string, log *slog.Logger) ([]hollow.Identity, *x509.Certificate, error) {
	kube, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	nodes := make([]string, c.edges)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("%s-%05d", c.prefix, i)
	}
	if err := hollow.EnsureNamespace(ctx, kube, c.namespace); err != nil {
		return nil, nil, err
	}
	if err := w.Create(ctx, kube, nodes); err != nil {
		return nil, nil, err
	}
	return hollow.Onboard(ctx, kube, nodes, hollow.OnboardConfig{Logger: log})
}

func newScale() *cobra.Command {
	var c common
	var bin string
	var idle, timeout time.Duration
	var dump, cpuProfile, profileDir string
	var perProcess, nice, gomaxprocs int
	var inProcess bool
	cmd := &cobra.Command{
		Use:   "scale",
		Short: "start a control plane and one CloudCore process and measure them with hollow edges",
		RunE: func(*cobra.Command, []string) error {
			ctx, stop := signalContext()
			defer stop()
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return fmt.Errorf("create CPU profile: %w", err)
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return fmt.Errorf("start CPU profile: %w", err)
				}
				defer pprof.StopCPUProfile()
			}
			hollowedge := ""
			if !inProcess {
				exe, err := os.Executable()
				if err != nil {
					return fmt.Errorf("find this command's binary: %w", err)
				}
				hollowedge = exe
			}
			return scale(ctx, c, scaleFlags{bin: bin, hollowedge: hollowedge, perProcess: perProcess, nice: nice, gomaxprocs: gomaxprocs, idle: idle, timeout: timeout, dump: dump, profileDir: profileDir})
		},
	}
	c.flags(cmd)
	cmd.Flags().StringVar(&bin, "cloudcore", "", "cloudcore binary (empty: go build it into the data directory)")
	cmd.Flags().DurationVar(&idle, "idle", 30*time.Second, "window over which idle CPU is measured")
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Minute, "bound of each wait (connect, fan-out, storm)")
	cmd.Flags().StringVar(&cpuProfile, "cpuprofile", "", "file to write this process's CPU profile to (the hollow edges' cost)")
	cmd.Flags().IntVar(&perProcess, "per-process", hollow.DefaultPerProcess, "most edges one child `hollowedge run` process runs (each has its own open file limit)")
	cmd.Flags().IntVar(&nice, "hollow-nice", 0, "niceness of the child processes, so that CloudCore and the API server get the CPU first (0: the scale run's own)")
	cmd.Flags().IntVar(&gomaxprocs, "hollow-gomaxprocs", 1, "GOMAXPROCS of the child processes (0: the Go default)")
	cmd.Flags().BoolVar(&inProcess, "in-process", false, "run the edges in this process instead of child processes (at most about 2,800 edges: the open file limit)")
	cmd.Flags().StringVar(&profileDir, "heap-profile", "", "directory to write CloudCore's heap and goroutine profiles to, before the edges and at the end of the idle window (CloudCore runs with --pprof); empty: none")
	cmd.Flags().StringVar(&dump, "goroutine-dump", "", "file to write CloudCore's log with its goroutine dump to (SIGQUIT at the end); empty: none")
	return cmd
}

type scaleFlags struct {
	bin, hollowedge string
	perProcess      int
	nice            int
	gomaxprocs      int
	idle, timeout   time.Duration
	dump            string
	profileDir      string
}

func scale(ctx context.Context, c common, f scaleFlags) (err error) {
	bin, dump := f.bin, f.dump
	log := logger()
	// envtest logs through controller-runtime's global logger.
	ctrllog.SetLogger(logr.Discard())
	dir, err := os.MkdirTemp(c.dataRoot, "hollowedge-")
	if err != nil {
		return fmt.Errorf("create data root: %w", err)
	}
	defer func() {
		if err != nil {
			// CloudCore's log says what went wrong; the stores are gone.
			log.Warn("scale run failed; CloudCore's log is kept", "dir", dir)
			return
		}
		_ = os.RemoveAll(dir)
	}()
	if bin == "" {
		if bin, err = hollow.BuildCloudCore(ctx, dir); err != nil {
			return err
		}
	}
	env, err := controlplane.New()
	if err != nil {
		return err
	}
	defer func() {
		if err := env.Stop(); err != nil {
			log.Warn("stop control plane", "err", err)
		}
	}()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	if err := hollow.EnsureNamespace(ctx, env.Config, c.namespace); err != nil {
		return err
	}
	res, err := hollow.Scale(ctx, hollow.ScaleConfig{
		Kube: env.Config, KubeConfig: kubeconfig, CloudCore: bin, Dir: dir, Edges: c.edges, Prefix: c.prefix,
		Workload: hollow.Workload{Namespace: c.namespace, ConfigMap: c.configMap, PodsPerEdge: c.podsPerEdge}, Rate: c.rate,
		LeaseDuration: c.lease, StatusEvery: c.status, Backoff: tunnel.Backoff{Min: c.backoffMin, Max: c.backoffMax},
		KeepAlive: c.keepAlive, DeadPeerTimeout: c.deadPeer,
		Hollowedge: f.hollowedge, PerProcess: f.perProcess, Nice: f.nice, GOMAXPROCS: f.gomaxprocs,
		Idle: f.idle, Timeout: f.timeout, DumpGoroutines: dump != "", ProfileDir: f.profileDir, Logger: log,
	})
	if res != nil {
		report(res)
		if dump != "" && len(res.GoroutineDump) > 0 {
			if werr := os.WriteFile(dump, res.GoroutineDump, 0o600); werr != nil {
				err = errors.Join(err, fmt.Errorf("write goroutine dump: %w", werr))
			}
		}
	}
	return err
}

// report prints the figures of a scale run.
func report(r *hollow.ScaleResult) {
	n := float64(r.Edges)
	mib := func(b float64) float64 { return b / (1 << 20) }
	kib := func(b float64) float64 { return b / (1 << 10) }
	p := func(ds []time.Duration, q float64) time.Duration {
		return hollow.Percentile(ds, q).Round(time.Millisecond)
	}
	fmt.Printf("edges %d in %d processes, objects held %d (%.1f per edge)\n", r.Edges, r.Processes, r.Objects, float64(r.Objects)/n)
	fmt.Printf("connect: all in %s; to session p50 %s p99 %s; to first reconcile p50 %s p99 %s\n",
		r.ConnectAll.Round(time.Millisecond), p(r.Connect, 50), p(r.Connect, 99), p(r.Reconciled, 50), p(r.Reconciled, 99))
	fmt.Printf("cloudcore before edges: RSS %.1f MiB, heap in use %.1f MiB, goroutines %.0f\n", mib(r.Before.RSS), mib(r.Before.HeapInuse), r.Before.Goroutines)
	fmt.Printf("cloudcore connected:    RSS %.1f MiB, heap in use %.1f MiB, goroutines %.0f\n", mib(r.Connected.RSS), mib(r.Connected.HeapInuse), r.Connected.Goroutines)
	fmt.Printf("per edge: RSS %.1f KiB, heap in use %.1f KiB, goroutines %.2f\n",
		kib(r.Connected.RSS-r.Before.RSS)/n, kib(r.Connected.HeapInuse-r.Before.HeapInuse)/n, (r.Connected.Goroutines-r.Before.Goroutines)/n)
	fmt.Printf("idle: CloudCore CPU %.3f cores (%.1f µs per edge per second), its threads waited %.2f s/s for a CPU; hollow processes %.3f cores\n",
		r.IdleCPU, r.IdleCPU/n*1e6, r.IdleWait, r.HollowIdleCPU)
	fmt.Printf("idle: API requests in the window %s\n", apiWindow(r.IdleRequests))
	fmt.Printf("lease age (renew every %s): p50 %s p99 %s max %s over %d leases\n", r.LeaseRenew, p(r.LeaseAges, 50), p(r.LeaseAges, 99), p(r.LeaseAges, 100), len(r.LeaseAges))
	fmt.Printf("fan-out of one ConfigMap change: p50 %s p99 %s max %s over %d stores\n", p(r.FanOut, 50), p(r.FanOut, 99), p(r.FanOut, 100), len(r.FanOut))
	fmt.Printf("storm: SIGKILL to ready %s, to last edge reconciled %s; reconcile ends from SIGKILL p10 %s p50 %s p90 %s p99 %s\n",
		r.StormReady.Round(time.Millisecond), r.StormLast.Round(time.Millisecond),
		p(r.StormSpread, 10), p(r.StormSpread, 50), p(r.StormSpread, 90), p(r.StormSpread, 99))
	fmt.Printf("storm: API requests from ready to last reconciled %s\n", apiWindow(r.StormRequests))
	fmt.Printf("hollowedge processes: RSS %.1f MiB (%.1f KiB per edge), %d open files (%.1f per edge, at most %d in one process)\n",
		mib(r.HollowRSS), kib(r.HollowRSS)/n, r.HollowFDs, float64(r.HollowFDs)/n, r.HollowMaxFDs)
	fmt.Printf("cloudcore after storm:  RSS %.1f MiB, heap in use %.1f MiB, goroutines %.0f\n", mib(r.After.RSS), mib(r.After.HeapInuse), r.After.Goroutines)
}

// apiWindow prints an API server window: requests and failures by verb,
// and each verb's mean and p99 duration.
func apiWindow(w hollow.APISample) string {
	s := sorted(w.Requests) + " failed (429, 5xx) " + sorted(w.Failed) + " duration mean/p99"
	for _, verb := range w.Verbs() {
		mean, p99 := w.Latency(verb, 0.99)
		s += fmt.Sprintf(" %s=%s/%s", verb, mean.Round(time.Millisecond), p99.Round(time.Millisecond))
	}
	return s
}

func sorted(m map[string]float64) string {
	s := ""
	for _, k := range slices.Sorted(maps.Keys(m)) {
		s += fmt.Sprintf(" %s=%.0f", k, m[k])
	}
	return "{" + s + " }"
}

func newWriteCap() *cobra.Command {
	var c hollow.CapacityConfig
	cmd := &cobra.Command{
		Use:   "writecap",
		Short: "start a control plane and measure how many lease renewals a second its API server takes",
		RunE: func(*cobra.Command, []string) error {
			ctx, stop := signalContext()
			defer stop()
			ctrllog.SetLogger(logr.Discard())
			// client-go logs the renewals the window's end cuts.
			klog.SetLogger(logr.Discard())
			env, err := controlplane.New()
			if err != nil {
				return err
			}
			defer func() { _ = env.Stop() }()
			res, err := hollow.WriteCapacity(ctx, env.Config, c)
			if err != nil {
				return err
			}
			fmt.Printf("lease renewals: %d ok (%.1f/s), %d failed, over %s with %d writers and %d leases; latency p50 %s p99 %s max %s\n",
				res.Writes, res.PerSecond, res.Failed, c.Duration, c.Writers, c.Leases,
				hollow.Percentile(res.Latencies, 50).Round(time.Millisecond), hollow.Percentile(res.Latencies, 99).Round(time.Millisecond),
				hollow.Percentile(res.Latencies, 100).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().IntVar(&c.Leases, "leases", 1000, "leases renewed in turn")
	cmd.Flags().IntVar(&c.Writers, "writers", 32, "renewals in flight at once")
	cmd.Flags().DurationVar(&c.Duration, "duration", 30*time.Second, "measured window")
	return cmd
}
