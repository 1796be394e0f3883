package pods_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
)

// runningClock is a Publisher that notes when the first status with the
// pod Running was published for each UID.
type runningClock struct {
	mu      sync.Mutex
	running map[string]time.Time
	ch      chan string
}

func newRunningClock() *runningClock {
	return &runningClock{running: map[string]time.Time{}, ch: make(chan string, 1000)}
}

func (r *runningClock) Publish(_ context.Context, it store.OutboxItem) error {
	now := time.Now()
	if it.Op != message.OpStatus {
		return nil
	}
	var st corev1.PodStatus
	if err := json.Unmarshal(it.Data, &st); err != nil {
		return err
	}
	if !running(st) {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.running[it.Resource.UID]; !ok {
		r.running[it.Resource.UID] = now
		r.ch <- it.Resource.UID
	}
	return nil
}

func (r *runningClock) at(uid types.UID) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.running[string(uid)]
}

// benchEnv is a containerd, a store and a running manager for benchmarks.
type benchEnv struct {
	b   *testing.B
	ctx context.Context
	h   *containerd.Host
	st  *store.Store
	pub *runningClock
}

// newBenchEnv runs a manager that syncs workers pods at once (0: the
// default, 4).
func newBenchEnv(b *testing.B, workers int) *benchEnv {
	h := containerd.Start(b)
	ctx, cancel := context.WithCancel(klog.NewContext(context.Background(), logr.Discard()))
	dir := b.TempDir()
	st, err := store.Open(ctx, filepath.Join(dir, "edgecore.db"), nil)
	require.NoError(b, err)
	pub := newRunningClock()
	m, err := pods.New(pods.Config{
		Node: "edge-1", HostIPs: []string{"192.0.2.10"},
		LogDir: filepath.Join(dir, "logs"), RootDir: filepath.Join(dir, "pods"),
		Workers: workers,
	}, st, h.Runtime, h.Images, pub, nil)
	require.NoError(b, err)
	cancelSub := st.Subscribe(m.OnStoreChange)
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	b.Cleanup(func() {
		cancelSub()
		cancel()
		require.NoError(b, <-done)
		require.NoError(b, st.Close())
	})
	return &benchEnv{b: b, ctx: ctx, h: h, st: st, pub: pub}
}

func (e *benchEnv) apply(op message.Op, p *corev1.Pod) {
	data, err := json.Marshal(p)
	require.NoError(e.b, err)
	r := message.Resource{Version: "v1", Kind: "Pod", Namespace: p.Namespace, Name: p.Name, UID: string(p.UID)}
	require.NoError(e.b, e.st.Apply(e.ctx, []store.Change{{Op: op, Object: store.Object{Resource: r, Version: "1", Data: data}}}))
}

// round writes n pods into the store, one after the other (each once the
// one before is Running) or all at once, and returns the time from each
// store write to the publication of its Running status. Then it deletes
// them and waits until their sandboxes are gone, untimed.
func (e *benchEnv) round(prefix string, n int, together bool) []time.Duration {
	ps := make([]*corev1.Pod, n)
	written := make([]time.Time, n)
	for i := range ps {
		ps[i] = busyboxPod(e.h, fmt.Sprintf("%s-%d", prefix, i), corev1.RestartPolicyAlways, true, "sleep", "3600")
	}
	wait := func() {
		select {
		case <-e.pub.ch:
		case <-time.After(2 * time.Minute):
			e.b.Fatal("no pod reached Running within 2 minutes")
		}
	}
	for i, p := range ps {
		written[i] = time.Now()
		e.apply(message.OpUpsert, p)
		if !together {
			wait()
		}
	}
	if together {
		for range ps {
			wait()
		}
	}
	out := make([]time.Duration, n)
	for i, p := range ps {
		out[i] = e.pub.at(p.UID).Sub(written[i])
	}
	for _, p := range ps {
		e.apply(message.OpDelete, p)
	}
	require.Eventually(e.b, func() bool {
		sbs, err := e.h.Runtime.ListPodSandbox(e.ctx, nil)
		return err == nil && len(sbs) == 0
	}, 2*time.Minute, 50*time.Millisecond)
	return out
}

// alone runs n pods of the same sandbox and container straight to
// containerd (the shared baseline, tests/containerd.Host.RunAlone) and
// returns each one's time.
func (e *benchEnv) alone(prefix string, n int, together bool) []time.Duration {
	out, err := e.h.RunAlone(e.ctx, e.h.Runtime, prefix, n, together)
	require.NoError(e.b, err)
	return out
}

func pct(d []time.Duration, p float64) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	i := min(int(float64(len(s))*p), len(s)-1)
	return float64(s[i]) / float64(time.Millisecond)
}

// BenchmarkPodCreateToRunning (issue 8, section 6): a host-network busybox
// pod written into the store until the manager publishes its Running
// status (the edge's share of "create in the API server to Running in the
// API server": the tunnel and the API server are left out), 20 pods one
// after another and 20 at once, p50 and p99 over the pods of every
// iteration. In the same run, containerd alone: the same sandbox and
// container through RunPodSandbox, CreateContainer and StartContainer
// straight to containerd, the same 20 and 20. Each iteration is one round
// of each of the four, interleaved so that the load of the shared machine
// falls on both sides alike; ns/op is the whole iteration and means
// little. Sub-benchmarks: the default 4 workers, and 20 (one per pod of a
// concurrent round).
func BenchmarkPodCreateToRunning(b *testing.B) {
	for _, workers := range []int{4, 20} {
		b.Run(fmt.Sprintf("workers=%d", workers), func(b *testing.B) { benchCreateToRunning(b, workers) })
	}
}

func benchCreateToRunning(b *testing.B, workers int) {
	e := newBenchEnv(b, workers)
	const n = 20
	var seq, conc, aloneSeq, aloneConc []time.Duration
	for i := range b.N {
		seq = append(seq, e.round(fmt.Sprintf("seq%d", i), n, false)...)
		aloneSeq = append(aloneSeq, e.alone(fmt.Sprintf("aseq%d", i), n, false)...)
		conc = append(conc, e.round(fmt.Sprintf("conc%d", i), n, true)...)
		aloneConc = append(aloneConc, e.alone(fmt.Sprintf("aconc%d", i), n, true)...)
	}
	for _, m := range []struct {
		name string
		d    []time.Duration
	}{{"seq", seq}, {"alone-seq", aloneSeq}, {"conc", conc}, {"alone-conc", aloneConc}} {
		b.ReportMetric(pct(m.d, 0.5), m.name+"-p50-ms")
		b.ReportMetric(pct(m.d, 0.99), m.name+"-p99-ms")
	}
	b.ReportMetric(pct(seq, 0.5)-pct(aloneSeq, 0.5), "seq-p50-diff-ms")
	b.ReportMetric(pct(conc, 0.5)-pct(aloneConc, 0.5), "conc-p50-diff-ms")
}

// BenchmarkManagerMemory is a reading, not a timing: the memory of the
// test process (the pod manager, its SQLite store and its CRI clients; no
// tunnel, syncer or node status) idle and with 100 host-network busybox
// pods Running, after a GC each time: Go's HeapInuse and Sys
// (runtime.MemStats) and the process's VmRSS (/proc/self/status; it
// includes the test binary's code). containerd, its shims and the
// containers are other processes and not counted. Run it with
// -benchtime 1x.
func BenchmarkManagerMemory(b *testing.B) {
	e := newBenchEnv(b, 0)
	const n = 100
	for i := range b.N {
		idle := readMem(b)
		ps := make([]*corev1.Pod, n)
		for j := range ps {
			ps[j] = busyboxPod(e.h, fmt.Sprintf("mem%d-%d", i, j), corev1.RestartPolicyAlways, true, "sleep", "3600")
			e.apply(message.OpUpsert, ps[j])
		}
		for range ps {
			select {
			case <-e.pub.ch:
			case <-time.After(5 * time.Minute):
				b.Fatal("100 pods not Running within 5 minutes")
			}
		}
		full := readMem(b)
		b.ReportMetric(idle.heap, "idle-heapinuse-MB")
		b.ReportMetric(idle.sys, "idle-sys-MB")
		b.ReportMetric(idle.rss, "idle-rss-MB")
		b.ReportMetric(full.heap, "100pods-heapinuse-MB")
		b.ReportMetric(full.sys, "100pods-sys-MB")
		b.ReportMetric(full.rss, "100pods-rss-MB")
		b.ReportMetric(float64(full.goroutines), "100pods-goroutines")
		b.StopTimer()
		for _, p := range ps {
			e.apply(message.OpDelete, p)
		}
		require.Eventually(b, func() bool {
			sbs, err := e.h.Runtime.ListPodSandbox(e.ctx, nil)
			return err == nil && len(sbs) == 0
		}, 5*time.Minute, 100*time.Millisecond)
		b.StartTimer()
	}
}

type memReading struct {
	heap, sys, rss float64
	goroutines     int
}

func readMem(b *testing.B) memReading {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	const mb = 1 << 20
	r := memReading{heap: float64(ms.HeapInuse) / mb, sys: float64(ms.Sys) / mb, goroutines: runtime.NumGoroutine()}
	status, err := os.ReadFile("/proc/self/status")
	require.NoError(b, err)
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			require.NoError(b, err)
			r.rss = kb / 1024
		}
	}
	return r
}
