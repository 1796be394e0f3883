package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/onboard"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/netproxy"
)

const (
	// churnPerEdge is the changes per second made to each edge's objects
	// (at most: each waits for the API server's answer to the one before).
	churnPerEdge = 10
	// minCutChanges is how many changes the churn must have made to each
	// edge's objects during each long partition for the run to count:
	// changes held back by the cut are what the resends, the reconnect's
	// reconcile and the ordering checks are about. A count, not a rate,
	// so that a slow machine (each change waits for the API server) makes
	// a run that still counts: on a quiet one a 12 s partition sees some
	// 100 per edge, and 10 asks less than one a second.
	minCutChanges = 10
	// settle bounds the wait for the edges to converge once the path is
	// clean and the churn has stopped.
	settle = 90 * time.Second
)

// TestChaos churns the objects of two edges while the path between them
// and CloudCore loses, delays and cuts packets and each process is killed
// with SIGKILL and restarted; see the package comment. Both transports run
// in parallel, each with its own CloudCore, proxy, edges and namespace.
func TestChaos(t *testing.T) {
	sched := shortSchedule()
	if fullRun() {
		sched = fullSchedule()
	}
	env := cp.Env(t)
	t.Log(sched)
	for _, tr := range []string{"quic", "websocket"} {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			runChaos(t, env, tr, sched)
		})
	}
}

// rig is one transport's run: the processes, the proxy between the edges
// and the cloud, and what happened.
type rig struct {
	t      *testing.T
	proxy  *netproxy.Proxy
	cloud  *proc
	edges  []*edgeRig
	rng    *rand.Rand
	start  time.Time
	mu     sync.Mutex
	events []string
}

// edgeRig is one edge and the history of what it applied.
type edgeRig struct {
	node    string
	proc    *proc
	db      string
	history []applied
	kills   int
	wrong   []string // keys that differed at the last check
}

// note adds a line to the timeline printed at the end.
func (r *rig) note(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, fmt.Sprintf("%8s  %s", time.Since(r.start).Round(10*time.Millisecond), fmt.Sprintf(format, args...)))
}

func (r *rig) timeline() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.events, "\n")
}

func (r *rig) clean() {
	r.proxy.SetLoss(0)
	r.proxy.SetDelay(0)
	r.proxy.Partition(false)
}

// collect appends what the edge's last run recorded to its history.
func (e *edgeRig) collect() error {
	run := e.proc.runs
	a, err := readApplied(e.proc.appliedPath(run), fmt.Sprintf("run %d", run))
	e.history = append(e.history, a...)
	return err
}

// snapshot appends the edge's whole store to its history.
func (e *edgeRig) snapshot(ctx context.Context, src string) (edgeState, error) {
	st, err := readStore(ctx, e.db)
	if err != nil {
		return st, err
	}
	e.history = append(e.history, applied{op: 'S', at: time.Now(), snap: st.objects, src: src})
	return st, nil
}

// restartEdge records what the killed run applied and what its store
// held when it died, and starts it again on the same files.
func (r *rig) restartEdge(i int) error {
	e := r.edges[i]
	e.kills++
	if err := e.collect(); err != nil {
		return err
	}
	st, err := e.snapshot(context.Background(), fmt.Sprintf("store after SIGKILL %d", e.kills))
	if err != nil {
		return err
	}
	r.note("edge %s store after SIGKILL: %d objects, %d outbox items", e.node, len(st.objects), len(st.outbox))
	return e.proc.start()
}

func freePort(t *testing.T, network string) string {
	t.Helper()
	if network == "udp" {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		defer c.Close()
		return c.LocalAddr().String()
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

func runChaos(t *testing.T, env *controlplane.Env, transport string, sched schedule) {
	ctx := context.Background()
	dir := t.TempDir()
	if keep := os.Getenv("TETHER_CHAOS_DIR"); keep != "" {
		// Keep the logs, recorders and stores for a post-mortem.
		dir = filepath.Join(keep, fmt.Sprintf("%s-%s", transport, time.Now().Format("150405")))
		require.NoError(t, os.MkdirAll(dir, 0o700))
	}
	ns := env.Namespace(t)
	kc := rest.CopyConfig(env.Config)
	kc.QPS, kc.Burst = 1000, 1000
	cs, err := kubernetes.NewForConfig(kc)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(kc)
	require.NoError(t, err)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	require.NoError(t, os.WriteFile(kubeconfig, env.KubeConfig, 0o600))
	seed := rand.Uint64()
	suffix := fmt.Sprintf("%04x", seed&0xffff)
	r := &rig{t: t, rng: newRand(seed), start: time.Now()}
	t.Logf("%s: seed %d, namespace %s, files in %s", transport, seed, ns, dir)

	// CloudCore, with its own CA Secret per run.
	caName := "chaos-ca-" + transport + "-" + suffix
	cloudSpec := childSpec{
		Role: "cloud", KubeConfig: kubeconfig, QUIC: freePort(t, "udp"), WebSocket: freePort(t, "tcp"), Join: freePort(t, "tcp"),
		CANamespace: onboard.DefaultCANamespace, CAName: caName,
	}
	r.cloud = newProc(t, "cloudcore", dir, cloudSpec)
	require.NoError(t, r.cloud.start())
	ca, err := onboard.EnsureCA(ctx, cs, cloudSpec.CANamespace, caName, nil)
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = cs.CoreV1().Secrets(cloudSpec.CANamespace).Delete(context.Background(), caName, metav1.DeleteOptions{})
	})

	// The path: edges dial the proxy, which forwards to the cloud.
	target, network, scheme := cloudSpec.QUIC, "udp", "quic://"
	if transport == "websocket" {
		target, network, scheme = cloudSpec.WebSocket, "tcp", "wss://"
	}
	r.proxy = netproxy.Start(t, target, netproxy.Options{Network: network})

	// Two edges, whitelisted and joined as an operator would, each with an
	// anchor pod and a churner.
	vers := newVersions()
	nodes := edgenode.NewClient(dyn)
	var churners []*churner
	for i, name := range []string{"a", "b"} {
		node := fmt.Sprintf("chaos-%s-%s-%s", transport[:2], name, suffix)
		tok, _, err := onboard.Allow(ctx, nodes, ca.Cert, node, onboard.AllowOptions{})
		require.NoError(t, err)
		t.Cleanup(func() {
			_ = nodes.Delete(context.Background(), node)
			_ = cs.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{})
		})
		edir := filepath.Join(dir, node)
		_, err = edgejoin.Join(ctx, edgejoin.Config{Cloud: cloudSpec.Join, Token: tok.String(), Node: node, Dir: edir})
		require.NoError(t, err, "join %s", node)
		c := newChurner(cs, ns, node, vers, seed+uint64(i))
		require.NoError(t, c.anchor(ctx))
		churners = append(churners, c)
		e := &edgeRig{node: node, db: filepath.Join(edir, edgeapp.DBFile)}
		e.proc = newProc(t, node, dir, childSpec{Role: "edge", Node: node, Cloud: scheme + r.proxy.Addr().String(), Dir: edir})
		require.NoError(t, e.proc.start())
		r.edges = append(r.edges, e)
	}
	why := r.waitConverged(ctx, cs, ns, time.Time{}, 60*time.Second)
	require.Empty(t, why, "the edges did not converge before any fault")
	r.note("edges converged on a clean path; churn and faults start")

	// Churn and faults.
	churnCtx, stopChurn := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, c := range churners {
		wg.Go(func() { c.run(churnCtx, time.Second/churnPerEdge) })
	}
	start := time.Now()
	r.mu.Lock()
	r.start = start // the timeline counts from the start of the churn
	r.mu.Unlock()
	schedErr := sched.run(churnCtx, r, start)
	if schedErr == nil {
		waitUntil(ctx, start.Add(sched.length))
	}
	stopChurn()
	wg.Wait()
	churned := time.Since(start)
	r.clean()
	faultsEnd := time.Now()
	r.note("churn stopped, path clean")
	require.NoError(t, schedErr)

	total := 0
	var churnReport []string
	for _, c := range churners {
		total += c.total()
		churnReport = append(churnReport, fmt.Sprintf("%s: %d changes %v, %d failed %v", c.node, c.total(), c.counts, c.failures, c.firstErr))
	}
	rate := float64(total) / churned.Seconds()
	var thin []string
	for _, w := range sched.longCuts() {
		from, to := start.Add(w.at), start.Add(w.at+w.length)
		for _, c := range churners {
			n := c.during(from, to)
			churnReport = append(churnReport, fmt.Sprintf("%s: %d changes during the %s partition at %s", c.node, n, w.length, w.at))
			if n < minCutChanges {
				thin = append(thin, fmt.Sprintf("%s: %d changes during the %s partition at %s, want %d", c.node, n, w.length, w.at, minCutChanges))
			}
		}
	}

	// The end: every edge holds exactly what the API server says, its
	// outbox is empty and its node is Ready with a fresh heartbeat.
	why = r.waitConverged(ctx, cs, ns, faultsEnd, settle)
	if why == "" {
		r.note("edges converged")
	}
	var violations []string
	for _, e := range r.edges {
		require.NoError(t, e.collect())
		_, err := e.snapshot(ctx, "store at the end")
		require.NoError(t, err)
		violations = append(violations, checkOrder(e.node, e.history, vers)...)
	}
	var crashes []string
	for _, p := range append([]*proc{r.cloud}, r.edges[0].proc, r.edges[1].proc) {
		for _, s := range p.problems() {
			crashes = append(crashes, p.name+": "+s)
		}
	}

	report := r.report(transport, sched, rate, churnReport, violations)
	t.Log(report)
	if why != "" || len(violations) > 0 || len(crashes) > 0 || len(thin) > 0 {
		var b strings.Builder
		if len(thin) > 0 {
			fmt.Fprintf(&b, "the churn held too few changes back: the run does not count\n  %s\n", strings.Join(thin, "\n  "))
		}
		if why != "" {
			fmt.Fprintf(&b, "not converged %s after the faults ended:\n%s\n", settle, why)
		}
		if len(violations) > 0 {
			fmt.Fprintf(&b, "%d times an edge went back to an older state:\n  %s\n", len(violations), strings.Join(first(violations, 30), "\n  "))
		}
		if len(crashes) > 0 {
			fmt.Fprintf(&b, "processes that exited on their own:\n  %s\n", strings.Join(crashes, "\n  "))
		}
		for i, e := range r.edges {
			for _, k := range first(e.wrong, 10) {
				fmt.Fprintf(&b, "--- %s, key %s\n  the churn wrote: %s\n  the edge applied: %s\n",
					e.node, k, strings.Join(lastN(churners[i].writes[k], 8), "; "), strings.Join(lastN(keyHistory(e.history, k), 8), "; "))
			}
		}
		for _, p := range append([]*proc{r.cloud}, r.edges[0].proc, r.edges[1].proc) {
			fmt.Fprintf(&b, "--- last lines of %s:\n%s\n", p.logPath(), tail(p.logPath(), 25))
		}
		t.Errorf("%s chaos run failed:\n%s", transport, b.String())
	}
}

func lastN(s []string, n int) []string {
	if len(s) > n {
		return append([]string{fmt.Sprintf("(%d before)", len(s)-n)}, s[len(s)-n:]...)
	}
	return s
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("... %d more", len(s)-n))
	}
	return s
}

// waitConverged polls until every edge holds exactly what it must, its
// outbox is empty and its node is Ready with a heartbeat after since; it
// returns "" then, or why not at the deadline.
func (r *rig) waitConverged(ctx context.Context, cs kubernetes.Interface, ns string, since time.Time, within time.Duration) string {
	deadline := time.Now().Add(within)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		why := r.converged(ctx, cs, ns, since)
		if why == "" || time.Now().After(deadline) {
			return why
		}
		<-tick.C
	}
}

func (r *rig) converged(ctx context.Context, cs kubernetes.Interface, ns string, since time.Time) string {
	var problems []string
	for _, e := range r.edges {
		want, n, err := wanted(ctx, cs, ns, e.node)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", e.node, err))
			continue
		}
		st, err := readStore(ctx, e.db)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", e.node, err))
			continue
		}
		e.wrong = differing(want, st.objects)
		if d := diff(want, st.objects); d != "" {
			problems = append(problems, fmt.Sprintf("%s store: %s", e.node, d))
		}
		if len(st.outbox) > 0 {
			problems = append(problems, fmt.Sprintf("%s outbox: %d items waiting: %v", e.node, len(st.outbox), first(st.outbox, 5)))
		}
		if why := nodeReady(n, since); why != "" {
			problems = append(problems, fmt.Sprintf("%s node: %s", e.node, why))
		}
	}
	return strings.Join(problems, "\n")
}

func (r *rig) report(transport string, sched schedule, rate float64, churn, violations []string) string {
	var b strings.Builder
	st := r.proxy.Stats()
	fmt.Fprintf(&b, "%s, %s schedule: churn %.1f changes/s\n  %s\n", transport, sched.name, rate, strings.Join(churn, "\n  "))
	fmt.Fprintf(&b, "proxy: %d forwarded, %d dropped, %d stalled, %d flows\n", st.Forwarded, st.Dropped, st.Stalled, st.Flows)
	for _, e := range r.edges {
		fmt.Fprintf(&b, "%s applied: %s over %d runs\n", e.node, counts(e.history), e.proc.runs)
	}
	fmt.Fprintf(&b, "%d ordering violations\ntimeline:\n%s", len(violations), r.timeline())
	return b.String()
}
