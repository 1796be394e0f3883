package e2e

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	cri "k8s.io/cri-api/pkg/apis"
	remote "k8s.io/cri-client/pkg"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/containerd"
)

// podMarks notes, per pod name, when each step of its way from the API
// server to Running in the API server happened: its first commit into the
// edge store (the syncer's Apply returned), the first Running and Ready
// status the pod manager queued in the outbox (the syncer's Enqueue
// returned), and the first Running and Ready status the test's watch on
// the API server delivered.
type podMarks struct {
	mu        sync.Mutex
	committed map[string]time.Time
	queued    map[string]time.Time
	seen      map[string]time.Time
	waiters   map[string]chan struct{}
}

func newPodMarks() *podMarks {
	return &podMarks{committed: map[string]time.Time{}, queued: map[string]time.Time{}, seen: map[string]time.Time{}, waiters: map[string]chan struct{}{}}
}

// expect returns a channel closed once pod name is seen Running and Ready
// in the API server.
func (m *podMarks) expect(name string) <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch := make(chan struct{})
	m.waiters[name] = ch
	return ch
}

func (m *podMarks) mark(at map[string]time.Time, name string, t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := at[name]; ok {
		return
	}
	at[name] = t
}

func (m *podMarks) sawRunning(name string, t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.seen[name]; ok {
		return
	}
	m.seen[name] = t
	if ch, ok := m.waiters[name]; ok {
		close(ch)
		delete(m.waiters, name)
	}
}

func (m *podMarks) get(name string) (committed, queued, seen time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.committed[name], m.queued[name], m.seen[name]
}

// markedStore is the edge store as the syncer sees it, marking pod commits
// and queued Running statuses. Decoding each status costs the outbox
// path some microseconds.
type markedStore struct {
	*store.Store
	m *podMarks
}

func (s markedStore) Apply(ctx context.Context, changes []store.Change) error {
	if err := s.Store.Apply(ctx, changes); err != nil {
		return err
	}
	now := time.Now()
	for _, c := range changes {
		if c.Op == message.OpUpsert && c.Object.Resource.Kind == "Pod" {
			s.m.mark(s.m.committed, c.Object.Resource.Name, now)
		}
	}
	return nil
}

func (s markedStore) Enqueue(ctx context.Context, it store.OutboxItem) (uint64, error) {
	seq, err := s.Store.Enqueue(ctx, it)
	if err != nil || it.Op != message.OpStatus || it.Resource.Kind != "Pod" {
		return seq, err
	}
	now := time.Now()
	var st corev1.PodStatus
	if json.Unmarshal(it.Data, &st) == nil && runningReady(&corev1.Pod{Status: st}) {
		s.m.mark(s.m.queued, it.Resource.Name, now)
	}
	return seq, err
}

// watchRunning marks each pod of r's namespace the first time the API
// server's watch shows it Running and Ready, until tb ends.
func watchRunning(tb testing.TB, r *podRig, m *podMarks) {
	w, err := r.cs.CoreV1().Pods(r.ns).Watch(context.Background(), metav1.ListOptions{})
	require.NoError(tb, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			now := time.Now()
			if p, ok := ev.Object.(*corev1.Pod); ok && ev.Type != watch.Deleted && runningReady(p) {
				m.sawRunning(p.Name, now)
			}
		}
	}()
	tb.Cleanup(func() { w.Stop(); <-done })
}

// benchPod is the pod of the benchmarks: busybox sleep 3600, host network,
// the image present, the same container as tests/containerd's
// BusyboxContainer runs for the baseline.
func (r *podRig) benchPod(name string) *corev1.Pod {
	p := r.pod(name, "")
	p.Spec.Containers[0].Command = []string{"sleep", "3600"}
	zero := int64(0)
	p.Spec.TerminationGracePeriodSeconds = &zero
	return p
}

// endToEnd creates n pods in the API server, one after another (each once
// the one before is seen Running) or all at once (from n goroutines), and
// returns, per pod, the time from the start of its Create call to its
// watch event with Running and Ready, and its three phases: to the edge
// store's commit, from there to the outbox, and from there to the watch.
// It returns the pods' names for removePods.
func (r *podRig) endToEnd(b *testing.B, m *podMarks, prefix string, n int, together bool) (p phases, names []string) {
	ctx := context.Background()
	names = make([]string, n)
	created := make([]time.Time, n)
	waits := make([]<-chan struct{}, n)
	create := func(i int) error {
		created[i] = time.Now()
		_, err := r.cs.CoreV1().Pods(r.ns).Create(ctx, r.benchPod(names[i]), metav1.CreateOptions{})
		return err
	}
	wait := func(i int) {
		select {
		case <-waits[i]:
		case <-time.After(3 * time.Minute):
			b.Fatalf("pod %s not seen Running within 3 minutes", names[i])
		}
	}
	for i := range names {
		names[i] = fmt.Sprintf("%s-%d", prefix, i)
		waits[i] = m.expect(names[i])
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		if !together {
			require.NoError(b, create(i))
			wait(i)
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = create(i) }()
	}
	wg.Wait()
	for i := range n {
		require.NoError(b, errs[i])
		wait(i)
	}
	for i, name := range names {
		committed, queued, seen := m.get(name)
		require.False(b, committed.IsZero() || queued.IsZero(), "pod %s: commit %v, queued %v", name, committed, queued)
		p.total = append(p.total, seen.Sub(created[i]))
		p.down = append(p.down, committed.Sub(created[i]))
		p.edge = append(p.edge, queued.Sub(committed))
		p.up = append(p.up, seen.Sub(queued))
	}
	return p, names
}

// phases are the times of endToEnd's pods.
type phases struct{ total, down, edge, up []time.Duration }

func (p *phases) add(o phases) {
	p.total, p.down, p.edge, p.up = append(p.total, o.total...), append(p.down, o.down...), append(p.edge, o.edge...), append(p.up, o.up...)
}

// removePods deletes the pods with grace period 0 and waits until
// containerd runs no sandbox, within timeout.
func (r *podRig) removePods(tb testing.TB, names []string, timeout time.Duration) {
	tb.Helper()
	ctx := context.Background()
	zero := int64(0)
	for _, name := range names {
		require.NoError(tb, r.cs.CoreV1().Pods(r.ns).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero}))
	}
	require.Eventually(tb, func() bool {
		sbs, err := r.h.Runtime.ListPodSandbox(ctx, nil)
		return err == nil && len(sbs) == 0
	}, timeout, 100*time.Millisecond, "the deleted pods' sandboxes are removed")
}

// criCalls are the shim's calls by method (tether_cri_call_seconds): how
// many, and their time in all.
type criCalls map[string]struct {
	n   uint64
	sum float64
}

func readCRICalls(tb testing.TB, g prometheus.Gatherer) criCalls {
	tb.Helper()
	mfs, err := g.Gather()
	require.NoError(tb, err)
	out := criCalls{}
	for _, mf := range mfs {
		if mf.GetName() != "tether_cri_call_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "method" {
					out[l.GetValue()] = struct {
						n   uint64
						sum float64
					}{m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()}
				}
			}
		}
	}
	require.NotEmpty(tb, out, "the shim's call histogram")
	return out
}

// perPod describes the calls made between before and after for pods pods:
// calls and ms per pod for each method, most time first, and the total
// ms per pod.
func perPod(before, after criCalls, pods int) (string, float64) {
	type row struct {
		method string
		n, ms  float64
	}
	var rows []row
	total := 0.0
	for method, a := range after {
		b := before[method]
		if a.n == b.n {
			continue
		}
		ms := (a.sum - b.sum) * 1000 / float64(pods)
		rows = append(rows, row{method, float64(a.n-b.n) / float64(pods), ms})
		total += ms
	}
	slices.SortFunc(rows, func(x, y row) int { return cmp.Compare(y.ms, x.ms) })
	var sb strings.Builder
	for _, r := range rows {
		fmt.Fprintf(&sb, "%s %.1f×/%.1fms ", r.method, r.n, r.ms)
	}
	return sb.String(), total
}

// alone is containerd alone: the same sandbox and container straight to
// containerd through rt (tests/containerd's RunAlone).
func (r *podRig) alone(b *testing.B, rt cri.RuntimeService, prefix string, n int, together bool) []time.Duration {
	d, err := r.h.RunAlone(context.Background(), rt, prefix, n, together)
	require.NoError(b, err)
	return d
}

// pairedShim runs n pairs of the baseline's pod, one straight to
// containerd and one through the shim (rt), the order swapped every pair,
// and returns each pair's difference, shim minus direct: the shim's share
// with the load of the moment cancelled out.
func (r *podRig) pairedShim(b *testing.B, shim cri.RuntimeService, prefix string, n int) []time.Duration {
	out := make([]time.Duration, n)
	for j := range n {
		direct := func() time.Duration { return r.alone(b, r.h.Runtime, fmt.Sprintf("%s-%d-d", prefix, j), 1, false)[0] }
		via := func() time.Duration { return r.alone(b, shim, fmt.Sprintf("%s-%d-s", prefix, j), 1, false)[0] }
		if j%2 == 0 {
			d := direct()
			out[j] = via() - d
		} else {
			v := via()
			out[j] = v - direct()
		}
	}
	return out
}

// shimClient is a CRI client of the edge's in-process shim, closed when tb
// ends.
func (r *podRig) shimClient(tb testing.TB) cri.RuntimeService {
	tb.Helper()
	ctx := klog.NewContext(context.Background(), logr.Discard())
	rt, err := remote.NewRemoteRuntimeService(ctx, "unix://"+r.e.criSocket, time.Minute, nil, false)
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = rt.Close(ctx) })
	return rt
}

// quantileMS is the nearest-rank quantile q of d, in ms.
func quantileMS(d []time.Duration, q float64) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return ms(percentile(s, q))
}

// BenchmarkPodAPIToRunning (issue 8, section 6) is the whole way of a pod:
// created in the API server, bound to the edge's node, until the API
// server's watch shows it Running and Ready. On the way: the cloud's
// informer and catalog, the dispatcher, the tunnel (QUIC on loopback,
// production timings), the edge's syncer and SQLite store, the pod
// manager, EdgeCore's in-process CRI shim, containerd, then the status
// through the outbox, the tunnel, CloudCore's upstream writer and the API
// server. 20 pods one after another (seq), 20 created at once (conc).
// The baseline, in the same run and interleaved with it so that the
// shared machine's load falls on both alike: containerd alone running the
// same sandbox and container from scratch (RunPodSandbox,
// CreateContainer, StartContainer), 20 one after another and 20 from 20
// goroutines; and shim-paired-diff: 20 pairs of the baseline's pod, one
// straight to containerd and one through EdgeCore's shim, order swapped
// every pair, the p50 of the differences (the shim's share, without the
// pod manager and with the baseline's minimal configs). It reports the p50 and p99 of each, the ratio and the
// difference of the p50s, and the p50 of each phase of the end-to-end
// way (down: create to the edge store's commit; edge: commit to the
// Running status in the outbox; up: outbox to the watch event), and
// shim-ms/pod: the time EdgeCore's CRI calls took in the shim
// (tether_cri_call_seconds, containerd included) during a round, per pod,
// the median over the rounds; each round's calls per method are logged.
// ns/op is a whole iteration (80 pods and their teardowns) and means
// little.
func BenchmarkPodAPIToRunning(b *testing.B) {
	m := newPodMarks()
	r := startPodRig(b, podRigOptions{wrap: func(st *store.Store) syncer.Store { return markedStore{Store: st, m: m} }})
	watchRunning(b, r, m)
	const n = 20
	var seq, conc phases
	var aloneSeq, aloneConc []time.Duration
	var shimSeq, shimConc []float64
	var viaShim []time.Duration
	shim := r.shimClient(b)
	b.ResetTimer()
	for i := range b.N {
		calls := readCRICalls(b, r.e.reg)
		p, names := r.endToEnd(b, m, fmt.Sprintf("seq%d", i), n, false)
		desc, ms := perPod(calls, readCRICalls(b, r.e.reg), n)
		b.Logf("seq round %d, shim calls per pod: %s", i, desc)
		seq.add(p)
		shimSeq = append(shimSeq, ms)
		r.removePods(b, names, 3*time.Minute)
		aloneSeq = append(aloneSeq, r.alone(b, r.h.Runtime, fmt.Sprintf("aseq%d", i), n, false)...)
		viaShim = append(viaShim, r.pairedShim(b, shim, fmt.Sprintf("pair%d", i), n)...)

		calls = readCRICalls(b, r.e.reg)
		p, names = r.endToEnd(b, m, fmt.Sprintf("conc%d", i), n, true)
		desc, ms = perPod(calls, readCRICalls(b, r.e.reg), n)
		b.Logf("conc round %d, shim calls per pod: %s", i, desc)
		conc.add(p)
		shimConc = append(shimConc, ms)
		r.removePods(b, names, 3*time.Minute)
		aloneConc = append(aloneConc, r.alone(b, r.h.Runtime, fmt.Sprintf("aconc%d", i), n, true)...)
	}
	b.StopTimer()
	for _, s := range []struct {
		name string
		e2e  phases
		base []time.Duration
		shim []float64
	}{{"seq", seq, aloneSeq, shimSeq}, {"conc", conc, aloneConc, shimConc}} {
		p50, base := quantileMS(s.e2e.total, 0.5), quantileMS(s.base, 0.5)
		b.ReportMetric(p50, s.name+"-p50-ms")
		b.ReportMetric(quantileMS(s.e2e.total, 0.99), s.name+"-p99-ms")
		b.ReportMetric(base, "alone-"+s.name+"-p50-ms")
		b.ReportMetric(quantileMS(s.base, 0.99), "alone-"+s.name+"-p99-ms")
		b.ReportMetric(p50-base, s.name+"-p50-diff-ms")
		b.ReportMetric(p50/base, s.name+"-p50-ratio")
		b.ReportMetric(quantileMS(s.e2e.down, 0.5), s.name+"-down-p50-ms")
		b.ReportMetric(quantileMS(s.e2e.edge, 0.5), s.name+"-edge-p50-ms")
		b.ReportMetric(quantileMS(s.e2e.up, 0.5), s.name+"-up-p50-ms")
		slices.Sort(s.shim)
		b.ReportMetric(s.shim[len(s.shim)/2], s.name+"-shim-ms/pod")
	}
	b.ReportMetric(quantileMS(viaShim, 0.5), "shim-paired-diff-p50-ms")
}

// BenchmarkEdgeRSS (issue 8, section 6) is a reading, not a timing: the
// resident memory (VmRSS of /proc/<pid>/status) of EdgeCore as a process
// of its own, idle (registered, Node Ready, no pods) and once 100 pods
// (busybox sleep 3600, host network) are Running in the API server, plus
// the process's peak (VmHWM) and its anonymous and file-backed shares
// (RssAnon, RssFile). EdgeCore runs its CRI shim in-process in front of a
// private containerd, the pod manager driving the shim, over QUIC to an
// in-process CloudCore; containerd, its shims and the containers are
// other processes and not counted. Two children:
//
//   - test-binary: this test binary started again as TestEdgeChild, which
//     runs edgecore/app. The binary holds every package the tests use
//     (the control plane helpers, CloudCore, client-go's informers); the
//     ones the child never calls still cost it their package
//     initialisation and the pages of code and data that touches.
//   - edgecore: the shipped command, built with go build, with
//     --cri-listen and --containerd. It keeps its pods' logs in
//     /var/log/pods (it has no flag for another place); the benchmark
//     removes that directory again if it made it and it is left empty.
//
// With TETHER_E2E_HEAP_PROFILE=path the test-binary child's heap profile
// with 100 pods is copied there. Run with -benchtime 1x.
func BenchmarkEdgeRSS(b *testing.B) {
	h := containerd.Start(b)
	env := cp.Env(b)
	cs := adminClient(b, env.Config)
	c := startCloud(b, env.Config, cloudOptions{})
	criCfg, _ := runtimeConfig(b, h, pods.Config{})
	b.Run("child=test-binary", func(b *testing.B) {
		benchEdgeRSS(b, h, c, cs, env.Namespace(b), func(dir string, id identity) *exec.Cmd {
			for name, v := range map[string]string{"containerd": criCfg.Containerd, "cri-listen": criCfg.Listen} {
				require.NoError(b, os.WriteFile(filepath.Join(dir, name), []byte(v), 0o600))
			}
			cmd := exec.Command(os.Args[0], "-test.run=^TestEdgeChild$", "-test.count=1")
			cmd.Env = append(os.Environ(), childEnv+"="+dir)
			return cmd
		})
	})
	b.Run("child=edgecore", func(b *testing.B) {
		bin := filepath.Join(b.TempDir(), "edgecore")
		build := exec.Command("go", "build", "-o", bin, "github.com/tetheredge/tether/edgecore/cmd/edgecore")
		out, err := build.CombinedOutput()
		require.NoError(b, err, "go build edgecore: %s", out)
		const podLogs = "/var/log/pods"
		if _, err := os.Stat(podLogs); err != nil {
			b.Cleanup(func() { _ = os.Remove(podLogs) }) // only if empty
		}
		benchEdgeRSS(b, h, c, cs, env.Namespace(b), func(dir string, id identity) *exec.Cmd {
			return exec.Command(bin, "--cloud", "quic://"+c.addr, "--node", id.node, "--data-dir", dir,
				"--tls-cert", filepath.Join(dir, "node.crt"), "--tls-key", filepath.Join(dir, "node.key"), "--ca", filepath.Join(dir, "ca.crt"),
				"--cri-listen", criCfg.Listen, "--containerd", criCfg.Containerd, "--log-level", "warn", "--metrics-addr", "127.0.0.1:0")
		})
	})
}

// benchEdgeRSS runs the EdgeCore process that child returns for a fresh
// node whose identity is in dir, and reads its memory idle and with 100
// pods.
func benchEdgeRSS(b *testing.B, h *containerd.Host, c *cloud, cs kubernetes.Interface, ns string, child func(dir string, id identity) *exec.Cmd) {
	id := c.admit(b, uniqueNode("edge-rss"))
	dir := dataDir(b, id.node)
	writeChildFiles(b, dir, id, c.addr)
	cmd := child(dir, id)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	require.NoError(b, cmd.Start())
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	waitRegistered(b, cs, c, id.node)
	r := &podRig{cs: cs, ns: ns, node: id.node, h: h}
	idle := procMemory(b, cmd.Process.Pid)

	const n = 100
	b.ResetTimer()
	var full map[string]float64
	for i := range b.N {
		var g errgroup.Group
		g.SetLimit(8)
		names := make([]string, n)
		for j := range names {
			names[j] = fmt.Sprintf("rss%d-%d", i, j)
			g.Go(func() error {
				_, err := cs.CoreV1().Pods(ns).Create(context.Background(), r.benchPod(names[j]), metav1.CreateOptions{})
				return err
			})
		}
		require.NoError(b, g.Wait())
		require.Eventually(b, func() bool {
			list, err := cs.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{})
			if err != nil {
				return false
			}
			running := 0
			for k := range list.Items {
				if runningReady(&list.Items[k]) {
					running++
				}
			}
			return running == n
		}, 10*time.Minute, time.Second, "%d pods Running in the API server", n)
		full = procMemory(b, cmd.Process.Pid)
		b.StopTimer()
		if path := os.Getenv("TETHER_E2E_HEAP_PROFILE"); path != "" && i == 0 && cmd.Path == os.Args[0] {
			copyHeapProfile(b, cmd.Process.Pid, filepath.Join(dir, "heap.pprof"), path)
		}
		r.removePods(b, names, 10*time.Minute)
		b.StartTimer()
	}
	b.ReportMetric(idle["VmRSS"], "idle-rss-MB")
	b.ReportMetric(idle["RssAnon"], "idle-anon-MB")
	b.ReportMetric(full["VmRSS"], "100pods-rss-MB")
	b.ReportMetric(full["VmHWM"], "peak-rss-MB")
	b.ReportMetric(full["RssAnon"], "100pods-anon-MB")
	b.ReportMetric(full["RssFile"], "100pods-file-MB")
}

// procMemory reads the memory lines of /proc/pid/status that are in kB,
// in MB.
func procMemory(tb testing.TB, pid int) map[string]float64 {
	tb.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(tb, err)
	out := map[string]float64{}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		v, isKB := strings.CutSuffix(strings.TrimSpace(v), " kB")
		if !ok || !isKB {
			continue
		}
		kb, err := strconv.ParseFloat(v, 64)
		require.NoError(tb, err, "line %q", line)
		out[k] = kb / 1024
	}
	require.Contains(tb, out, "VmRSS")
	return out
}

// copyHeapProfile asks the child for a heap profile (SIGUSR1), waits for
// it at from and copies it to to.
func copyHeapProfile(tb testing.TB, pid int, from, to string) {
	tb.Helper()
	_ = os.Remove(from)
	require.NoError(tb, syscall.Kill(pid, syscall.SIGUSR1))
	var data []byte
	require.Eventually(tb, func() bool {
		var err error
		data, err = os.ReadFile(from)
		return err == nil && len(data) > 0
	}, 30*time.Second, 50*time.Millisecond, "the child writes its heap profile")
	require.NoError(tb, os.WriteFile(to, data, 0o644))
	tb.Logf("heap profile of the child with the pods running: %s", to)
}
