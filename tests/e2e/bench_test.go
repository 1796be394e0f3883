package e2e

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/promtest"
)

// The benchmarks in this file measure the sync protocol end to end: the real
// etcd and kube-apiserver, an in-process CloudCore (cloudcore/app) and
// in-process EdgeCores (edgecore/app) with SQLite files, over QUIC on
// loopback. They assert correctness (the edge
// ends up holding exactly what the catalog says), never timings; figures and
// the command that produced them are in docs/benchmarks.md.
//
// They use production tunnel settings (5 s keepalive, 15 s dead-peer
// timeout), unlike the tests, which shorten them to exercise failover.

// BenchmarkReconnect10k measures an edge holding 10,000 objects coming back
// after 10 of them changed while it was away, and, as the baseline, the
// same node syncing into an empty store: what a full relist costs over the
// same tunnel.
func BenchmarkReconnect10k(b *testing.B) { benchReconnect(b, 10_000, 10) }

// BenchmarkReconnect400 is the scenario KubeEdge was measured with on this
// machine: 400 objects, 5 or none changed while the edge was away.
func BenchmarkReconnect400(b *testing.B) {
	for _, changed := range []int{5, 0} {
		b.Run(fmt.Sprintf("changed=%d", changed), func(b *testing.B) { benchReconnect(b, 400, changed) })
	}
}

// benchReconnect runs, per round: a relist into an empty store, `changed`
// pod updates while the edge is away, and the reconnect of that store. The
// node holds `objects` objects: its Node, one ConfigMap and objects-2 pods
// that reference it. Reported figures are medians over the rounds.
func benchReconnect(b *testing.B, objects, changed int) {
	r, cs, ns, pods := newReconnectRun(b, fmt.Sprintf("bench-%d-%d", objects, changed), objects)
	c, node := r.cloud, r.node

	var relists, reconnects []traffic

	for round := 0; b.Loop(); round++ {
		want := desired(c.cat, node)
		require.Len(b, want, objects, "catalog's view of %s", node)
		dir := b.TempDir()
		relist := r.connect(b, dir, want, nil)

		for i := range changed {
			pod := pods[(round*changed+i)%len(pods)]
			patched, err := cs.CoreV1().Pods(ns).Patch(context.Background(), pod, types.MergePatchType,
				fmt.Appendf(nil, `{"metadata":{"labels":{"round":"%d"}}}`, round), metav1.PatchOptions{})
			require.NoError(b, err)
			waitCatalogVersion(b, c.cat, node, objsync.Key{Kind: "Pod", Namespace: ns, Name: pod}, patched.ResourceVersion)
		}
		if round == 0 {
			r.traceNext = 8
		}
		reconnect := r.connect(b, dir, desired(c.cat, node), want)
		if round == 0 {
			b.Logf("round 0: the reconnect's first datagrams:\n\t%s", strings.Join(r.relay.takeTrace(), "\n\t"))
		}

		b.Logf("round %d: relist %s; reconnect %s", round, relist, reconnect)
		relists = append(relists, relist)
		reconnects = append(reconnects, reconnect)
	}

	rl, rc := medianTraffic(relists), medianTraffic(reconnects)
	b.ReportMetric(0, "ns/op") // a round is several measurements; each is reported below
	reportTraffic(b, "relist-", rl)
	b.ReportMetric(ms(rl.converge), "relist-ms")
	reportTraffic(b, "", rc)
	b.ReportMetric(ms(rc.converge), "converge-ms")
	for d, dir := range []string{"down", "up"} {
		for c, n := range rc.byClass[d] {
			b.ReportMetric(float64(n), fmt.Sprintf("quic-%s-%s-B", dir, strings.ReplaceAll(datagramClassNames[c], ">", "gt")))
		}
	}
	b.ReportMetric(rc.objects, "objects-sent")
	b.ReportMetric(float64(rc.reads), "api-reads")
	b.ReportMetric((rl.down+rl.up)/(rc.down+rc.up), "relist/reconnect-B")
	b.ReportMetric(float64(rl.quicDown+rl.quicUp)/float64(rc.quicDown+rc.quicUp), "relist/reconnect-quic-B")
}

// newReconnectRun creates the edge node `node` holding `objects` objects
// (its Node, one ConfigMap and objects-2 pods that reference it), starts a
// cloud serving it only and a relay in front of the cloud, and registers
// the node once. It returns the run, the admin client, the namespace and
// the pods' names.
func newReconnectRun(b *testing.B, node string, objects int) (*reconnectRun, kubernetes.Interface, string, []string) {
	env := cp.Env(b)
	cs := adminClient(b, env.Config)
	ns := env.Namespace(b)
	createEdgeNode(b, cs, node)
	benchConfigMap(b, cs, ns, "shared")
	pods := make([]string, objects-2)
	for i := range pods {
		pods[i] = fmt.Sprintf("p-%05d", i)
	}
	begin := time.Now()
	benchPods(b, cs, ns, node, pods, "shared")
	created := time.Since(begin)
	b.Logf("created %d pods in %s (%.0f/s)", len(pods), created.Round(time.Millisecond), float64(len(pods))/created.Seconds())

	c := startCloud(b, env.Config, cloudOptions{})
	r := &reconnectRun{node: node, cloud: c, relay: startRelay(b, c.addr), id: c.admit(b, node)}
	// The edge registers its Node on its first start. Later starts may
	// write it again (a new heartbeat), which changes the Node: the
	// convergence below ignores the node's own Node, and the end of each
	// sync checks that the edge holds the catalog's version of it.
	warm := benchEdge(b, r.id, b.TempDir(), c.addr, nopObserver{})
	waitRegistered(b, cs, c, node)
	warm.stop()
	return r, cs, ns, pods
}

// BenchmarkReconnect400Minute is the scenario in wall-clock time:
// an edge holding 400 objects is away for 60 s while `changed` pods change,
// either cut off (its path blackholed: EdgeCore keeps running, its session
// times out and its dials are lost) or stopped (EdgeCore restarted on the
// same store), and every byte of the 60 s after it comes back is counted;
// then those of the idle minute that follows, with no reconnect. One round
// takes about three minutes.
func BenchmarkReconnect400Minute(b *testing.B) {
	for _, c := range []struct {
		mode    string
		changed int
	}{{"outage", 5}, {"outage", 0}, {"restart", 5}} {
		b.Run(fmt.Sprintf("%s/changed=%d", c.mode, c.changed), func(b *testing.B) { benchMinute(b, c.mode == "restart", c.changed) })
	}
}

// benchMinute runs BenchmarkReconnect400Minute's rounds for one mode.
func benchMinute(b *testing.B, restart bool, changed int) {
	const away, window = time.Minute, time.Minute
	r, cs, ns, pods := newReconnectRun(b, fmt.Sprintf("minute-%t-%d", restart, changed), 400)
	nodeKey := objsync.Key{Kind: "Node", Name: r.node}.Hash()
	holds := func(e *edge) func() bool { return func() bool { return r.holdsDesired(e.st) } }
	// wait blocks until d has passed since t: the scenario's own durations,
	// not a synchronisation.
	wait := func(t time.Time, d time.Duration) { <-time.After(time.Until(t.Add(d))) }
	var windows, idles []traffic
	for round := 0; b.Loop(); round++ {
		dir := b.TempDir()
		e := benchEdge(b, r.id, dir, r.relay.addr(), nopObserver{})
		require.Eventually(b, holds(e), 5*time.Minute, 10*time.Millisecond, "edge %s did not sync", r.node)
		r.settle(b)
		left := time.Now()
		if restart {
			e.stop()
		} else {
			r.relay.blocked.Store(true)
		}
		for i := range changed {
			pod := pods[(round*changed+i)%len(pods)]
			patched, err := cs.CoreV1().Pods(ns).Patch(context.Background(), pod, types.MergePatchType,
				fmt.Appendf(nil, `{"metadata":{"labels":{"round":"%d"}}}`, round), metav1.PatchOptions{})
			require.NoError(b, err)
			waitCatalogVersion(b, r.cloud.cat, r.node, objsync.Key{Kind: "Pod", Namespace: ns, Name: pod}, patched.ResourceVersion)
		}
		wait(left, away)
		before := r.snapshot(b)
		back := time.Now()
		if restart {
			e = benchEdge(b, r.id, dir, r.relay.addr(), nopObserver{})
		} else {
			r.relay.blocked.Store(false)
		}
		require.Eventually(b, holds(e), window, 10*time.Millisecond, "edge %s did not reconcile within the window", r.node)
		converged := time.Since(back)
		wait(back, window)
		mid := r.snapshot(b)
		wait(back, window+time.Minute)
		end := r.snapshot(b)
		requireHolds(b, e.st, without(desired(r.cloud.cat, r.node), nodeKey), nodeKey)
		e.stop()
		w, idle := mid.sub(before), end.sub(mid)
		w.converge = converged
		b.Logf("round %d: the 60 s after coming back: %s", round, w)
		b.Logf("round %d: the idle minute after: %s", round, idle)
		windows, idles = append(windows, w), append(idles, idle)
	}
	w, idle := medianTraffic(windows), medianTraffic(idles)
	b.ReportMetric(0, "ns/op")
	reportTraffic(b, "", w)
	b.ReportMetric(ms(w.converge), "converge-ms")
	reportTraffic(b, "idle-", idle)
}

// reportTraffic reports t's frame bytes and UDP payload bytes each way,
// under names that start with prefix.
func reportTraffic(b *testing.B, prefix string, t traffic) {
	b.ReportMetric(t.down, prefix+"down-B")
	b.ReportMetric(t.up, prefix+"up-B")
	b.ReportMetric(float64(t.quicDown), prefix+"quic-down-B")
	b.ReportMetric(float64(t.quicUp), prefix+"quic-up-B")
}

// reconnectRun connects one edge node, through a counting relay, to a cloud
// that serves no other node, so that the cloud's counters are that node's.
type reconnectRun struct {
	node  string
	cloud *cloud
	relay *udpRelay
	id    identity
	// traceNext, when set, has the next connect describe its first
	// traceNext datagrams each way (takeTrace), then is reset.
	traceNext int
}

// traffic is what crossed the tunnel during one sync, or a snapshot of the
// counters it is computed from.
type traffic struct {
	down, up         float64                      // frame bytes cloud→edge and edge→cloud, 4-byte prefixes included
	quicDown, quicUp int64                        // UDP payload bytes through the relay: QUIC and TLS included
	pktDown, pktUp   int64                        // UDP datagrams through the relay
	byClass          [2][numDatagramClasses]int64 // UDP payload bytes per direction (0 down, 1 up) and datagram class
	objects          float64                      // object messages the cloud sent
	done             float64                      // reconciles the cloud finished queueing
	reads            int64                        // API LISTs and GETs the cloud made
	converge         time.Duration
}

func (t traffic) sub(o traffic) traffic {
	var byClass [2][numDatagramClasses]int64
	for d := range byClass {
		for c := range byClass[d] {
			byClass[d][c] = t.byClass[d][c] - o.byClass[d][c]
		}
	}
	return traffic{
		byClass: byClass,
		down:    t.down - o.down, up: t.up - o.up,
		quicDown: t.quicDown - o.quicDown, quicUp: t.quicUp - o.quicUp,
		pktDown: t.pktDown - o.pktDown, pktUp: t.pktUp - o.pktUp,
		objects: t.objects - o.objects, done: t.done - o.done, reads: t.reads - o.reads,
	}
}

func (t traffic) String() string {
	return fmt.Sprintf("%.0f objects in %s: frames %.0f B down, %.0f B up; QUIC %d B (%d packets) down [%s], %d B (%d packets) up [%s]; %d API reads",
		t.objects, t.converge.Round(100*time.Microsecond), t.down, t.up, t.quicDown, t.pktDown, t.classes(0), t.quicUp, t.pktUp, t.classes(1), t.reads)
}

// classes formats direction d's bytes per datagram class.
func (t traffic) classes(d int) string {
	var parts []string
	for c, n := range t.byClass[d] {
		if n != 0 {
			parts = append(parts, fmt.Sprintf("%s %d", datagramClassNames[c], n))
		}
	}
	return strings.Join(parts, ", ")
}

func (r *reconnectRun) snapshot(tb testing.TB) traffic {
	reg := r.cloud.reg
	return traffic{
		down:     promtest.Sum(tb, reg, "tether_tunnel_bytes_total", map[string]string{"direction": "out"}),
		up:       promtest.Sum(tb, reg, "tether_tunnel_bytes_total", map[string]string{"direction": "in"}),
		quicDown: r.relay.down.Load(), quicUp: r.relay.up.Load(),
		pktDown: r.relay.downPkts.Load(), pktUp: r.relay.upPkts.Load(),
		byClass: r.relay.classBytes(),
		objects: promtest.Sum(tb, reg, "tether_sync_messages_sent_total", map[string]string{"kind": "object"}),
		done:    promtest.Sum(tb, reg, "tether_sync_messages_sent_total", map[string]string{"kind": "done"}),
		reads:   r.cloud.requests.total(),
	}
}

// settle waits until no byte has crossed the relay for 100 ms and returns
// the counters then, so that trailing acks count and nothing else does.
func (r *reconnectRun) settle(tb testing.TB) traffic {
	tb.Helper()
	last := r.snapshot(tb)
	deadline := time.Now().Add(30 * time.Second)
	for quiet := 0; quiet < 5; {
		time.Sleep(20 * time.Millisecond)
		now := r.snapshot(tb)
		if now.quicDown == last.quicDown && now.quicUp == last.quicUp && now.down == last.down && now.up == last.up {
			quiet++
		} else {
			quiet = 0
		}
		last = now
		if time.Now().After(deadline) {
			tb.Fatalf("tunnel of %s still busy after 30s", r.node)
		}
	}
	return last
}

// connect starts the node's edge on the data directory dir, whose store holds have
// (nil: empty), waits until it holds want and the cloud has finished the
// reconcile, and stops it. The time runs from the edge's start, store
// opening included, to the commit that made the store equal want (seen as
// the syncer's Apply returns), or to the cloud sending Done if that came
// later, as when nothing changed (seen by polling its counter every 1 ms).
func (r *reconnectRun) connect(tb testing.TB, dir string, want, have map[uint64]uint64) traffic {
	tb.Helper()
	before := r.settle(tb)
	if r.traceNext > 0 {
		r.relay.startTrace(r.traceNext)
		r.traceNext = 0
	}
	nodeKey := objsync.Key{Kind: "Node", Name: r.node}.Hash()
	conv := newConvergence(without(want, nodeKey), without(have, nodeKey))
	conv.ignore = nodeKey
	start := time.Now()
	e := benchEdge(tb, r.id, dir, r.relay.addr(), conv)
	var doneAt time.Time
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	deadline := start.Add(5 * time.Minute)
	for doneAt.IsZero() || !conv.converged() {
		select {
		case <-tick.C:
		case <-conv.done:
		}
		if doneAt.IsZero() && promtest.Sum(tb, r.cloud.reg, "tether_sync_messages_sent_total", map[string]string{"kind": "done"}) > before.done {
			doneAt = time.Now()
		}
		if time.Now().After(deadline) {
			tb.Fatalf("edge %s did not converge in 5m: %d objects differ", r.node, conv.differing())
		}
	}
	end := conv.convergedAt()
	if doneAt.After(end) {
		end = doneAt
	}
	// The node's own Node, when the start wrote it, comes back down after
	// the API server's watch: wait for it, so that it is counted.
	require.Eventually(tb, func() bool { return r.holdsDesired(e.st) }, time.Minute, 5*time.Millisecond,
		"edge %s never held its Node at the catalog's version", r.node)
	after := r.settle(tb)
	// The objects the edge was to receive, and its own Node at the version
	// the catalog has now (a start may have written it).
	requireHolds(tb, e.st, without(want, nodeKey), nodeKey)
	requireHolds(tb, e.st, desired(r.cloud.cat, r.node)) // and nothing changed meanwhile
	e.stop()
	t := after.sub(before)
	t.converge = end.Sub(start)
	return t
}

// holdsDesired reports whether st holds exactly what the catalog says the
// node must hold now.
func (r *reconnectRun) holdsDesired(st *store.Store) bool {
	inv, err := st.Inventory(context.Background())
	if err != nil {
		return false
	}
	got := make(map[uint64]uint64, len(inv))
	for _, en := range inv {
		got[en.Key] = en.Version
	}
	return newConvergence(desired(r.cloud.cat, r.node), got).wrong == 0
}

// requireHolds fails tb unless st holds exactly want (key hash -> version
// hash), the keys in except left out, saying how many entries differ rather
// than printing them all.
func requireHolds(tb testing.TB, st *store.Store, want map[uint64]uint64, except ...uint64) {
	tb.Helper()
	inv, err := st.Inventory(context.Background())
	require.NoError(tb, err)
	got := make(map[uint64]uint64, len(inv))
	for _, e := range inv {
		if !slices.Contains(except, e.Key) {
			got[e.Key] = e.Version
		}
	}
	if c := newConvergence(want, got); c.wrong != 0 {
		tb.Fatalf("edge store holds %d objects, want %d; %d differ", len(got), len(want), c.wrong)
	}
}

// waitCatalogVersion waits until the catalog serves key to node at
// resourceVersion rv, so that an offline change is in the cloud's view
// before the edge comes back.
func waitCatalogVersion(tb testing.TB, cat *catalog.Catalog, node string, key objsync.Key, rv string) {
	tb.Helper()
	require.Eventually(tb, func() bool {
		o, ok := cat.Get(node, key)
		return ok && o.Version == rv
	}, 30*time.Second, time.Millisecond, "catalog never saw %s at %s", key, rv)
}

// BenchmarkEventLatency100Edges measures how long a change takes to reach
// the edges while 100 edges are connected to one cloud. A loop round
// updates 300 pods one after the other, three on each node, and measures
// from the API write returning to the pod's edge having committed the new
// resourceVersion to its store (synchronous=FULL, so an fsync is included).
// Commits are observed as the syncer's Apply returns, not polled, so the
// resolution is that of time.Now. Some commits land before the client has
// read the API server's response; those count as 0, and the same figures
// measured from the write being sent, an upper bound, are reported too.
// Each round also updates the ConfigMap every pod references 20 times and
// measures, from the write being sent, until the last of the 100 edges has
// committed it (fan-out).
func BenchmarkEventLatency100Edges(b *testing.B) {
	const edges, podsPerEdge, fanouts = 100, 3, 20
	env := cp.Env(b)
	cs := adminClient(b, env.Config)
	ns := env.Namespace(b)
	benchConfigMap(b, cs, ns, "shared")
	nodes := make([]string, edges)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("lat-%03d", i)
		createEdgeNode(b, cs, nodes[i])
		pods := make([]string, podsPerEdge)
		for j := range pods {
			pods[j] = fmt.Sprintf("%s-%d", nodes[i], j)
		}
		benchPods(b, cs, ns, nodes[i], pods, "shared")
	}

	c := startCloud(b, env.Config, cloudOptions{})
	probe := &arrivals{signal: make(chan struct{}, 1)}
	dir := b.TempDir()
	es := make([]*edge, edges)
	for i, node := range nodes {
		es[i] = benchEdge(b, c.admit(b, node), filepath.Join(dir, node), c.addr, probeObserver{probe, node})
	}
	for i, node := range nodes {
		require.Eventually(b, func() bool {
			want := desired(c.cat, node)
			inv, err := es[i].st.Inventory(context.Background())
			if err != nil || len(want) != 2+podsPerEdge || len(inv) != len(want) {
				return false
			}
			for _, e := range inv {
				if want[e.Key] != e.Version {
					return false
				}
			}
			return true
		}, time.Minute, 10*time.Millisecond, "edge %s did not sync", node)
	}
	b.Logf("%d edges connected and synced; %s", edges, processUsage())

	ctx := context.Background()
	var fromReturn, fromSend, fanout, fanoutFromSend []time.Duration
	early := 0
	for round := 0; b.Loop(); round++ {
		label := fmt.Appendf(nil, `{"metadata":{"labels":{"round":"%d"}}}`, round)
		for i := range edges * podsPerEdge {
			node := nodes[i%edges]
			pod := fmt.Sprintf("%s-%d", node, (i/edges)%podsPerEdge)
			sent, returned, committed := probe.update(b, objsync.Key{Kind: "Pod", Namespace: ns, Name: pod}, []string{node}, func() (string, error) {
				o, err := cs.CoreV1().Pods(ns).Patch(ctx, pod, types.MergePatchType, label, metav1.PatchOptions{})
				if err != nil {
					return "", err
				}
				return o.ResourceVersion, nil
			})
			if committed.Before(returned) {
				early++
			}
			fromReturn = append(fromReturn, max(committed.Sub(returned), 0))
			fromSend = append(fromSend, committed.Sub(sent))
		}
		for i := range fanouts {
			data := fmt.Appendf(nil, `{"data":{"k":"%d-%d"}}`, round, i)
			sent, returned, committed := probe.update(b, objsync.Key{Kind: "ConfigMap", Namespace: ns, Name: "shared"}, nodes, func() (string, error) {
				o, err := cs.CoreV1().ConfigMaps(ns).Patch(ctx, "shared", types.MergePatchType, data, metav1.PatchOptions{})
				if err != nil {
					return "", err
				}
				return o.ResourceVersion, nil
			})
			fanout = append(fanout, max(committed.Sub(returned), 0))
			fanoutFromSend = append(fanoutFromSend, committed.Sub(sent))
		}
	}
	for _, s := range [][]time.Duration{fromReturn, fromSend, fanout, fanoutFromSend} {
		slices.Sort(s)
	}
	b.Logf("pod updates: %d samples, %d committed before the write returned; from the write returning: %s; from the write being sent: %s",
		len(fromReturn), early, distribution(fromReturn), distribution(fromSend))
	b.Logf("ConfigMap updates to all %d edges: %d samples; until the last edge committed, from the write returning: %s; from the write being sent: %s",
		edges, len(fanout), distribution(fanout), distribution(fanoutFromSend))
	b.Logf("at the end: %s", processUsage())
	b.ReportMetric(0, "ns/op") // each round is many measurements, reported below
	b.ReportMetric(ms(percentile(fromReturn, 0.5)), "p50-ms")
	b.ReportMetric(ms(percentile(fromReturn, 0.99)), "p99-ms")
	b.ReportMetric(ms(fromReturn[len(fromReturn)-1]), "max-ms")
	b.ReportMetric(ms(percentile(fromSend, 0.5)), "p50-from-send-ms")
	b.ReportMetric(ms(percentile(fromSend, 0.99)), "p99-from-send-ms")
	b.ReportMetric(float64(len(fromReturn)), "samples")
	// The 100 commits keep both cores busy, which delays the ConfigMap
	// write's own response by tens of ms: the fan-out is timed from sending.
	b.ReportMetric(ms(percentile(fanoutFromSend, 0.5)), "fanout-p50-ms")
	b.ReportMetric(ms(fanoutFromSend[len(fanoutFromSend)-1]), "fanout-max-ms")
}

// arrivals records when the versions of one watched object commit at the
// edges. Updates are measured one at a time, so one watch is enough.
type arrivals struct {
	mu     sync.Mutex
	key    objsync.Key
	at     map[arrival]time.Time
	signal chan struct{}
}

type arrival struct{ node, version string }

// probeObserver is one edge's view of the probe.
type probeObserver struct {
	a    *arrivals
	node string
}

func (o probeObserver) applied(changes []store.Change, at time.Time) {
	o.a.mu.Lock()
	defer o.a.mu.Unlock()
	for _, c := range changes {
		if c.Object.Key() == o.a.key {
			o.a.at[arrival{o.node, c.Object.Version}] = at
			select {
			case o.a.signal <- struct{}{}:
			default:
			}
		}
	}
}

func (probeObserver) pruned([]objsync.Key, time.Time) {}

// update makes the write, which changes the object named key and returns
// its new resourceVersion, and waits until every one of nodes has committed
// that version. It returns when the write was sent and returned, and the
// last commit.
func (a *arrivals) update(tb testing.TB, key objsync.Key, nodes []string, write func() (string, error)) (sent, returned, committed time.Time) {
	tb.Helper()
	a.mu.Lock()
	a.key, a.at = key, make(map[arrival]time.Time)
	a.mu.Unlock()
	sent = time.Now()
	rv, err := write()
	returned = time.Now()
	require.NoError(tb, err)
	timeout := time.NewTimer(30 * time.Second)
	defer timeout.Stop()
	for {
		a.mu.Lock()
		missing := 0
		for _, n := range nodes {
			at, ok := a.at[arrival{n, rv}]
			if !ok {
				missing++
			} else if at.After(committed) {
				committed = at
			}
		}
		a.mu.Unlock()
		if missing == 0 {
			return sent, returned, committed
		}
		select {
		case <-a.signal:
		case <-timeout.C:
			tb.Fatalf("%d of %d edges did not commit %s at %s within 30s", missing, len(nodes), key, rv)
		}
	}
}

// distribution summarises sorted durations.
func distribution(sorted []time.Duration) string {
	r := func(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }
	return fmt.Sprintf("min %s, p50 %s, p90 %s, p99 %s, max %s", r(sorted[0]), r(percentile(sorted, 0.5)),
		r(percentile(sorted, 0.9)), r(percentile(sorted, 0.99)), r(sorted[len(sorted)-1]))
}

// processUsage returns the test process's open file descriptors and peak
// resident memory, as Linux reports them, or what could not be read.
func processUsage() string {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Sprintf("usage unknown: %v", err)
	}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return fmt.Sprintf("usage unknown: %v", err)
	}
	peak := "?"
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			peak = strings.Join(strings.Fields(v), " ")
		}
	}
	return fmt.Sprintf("test process: %d open fds, peak RSS %s", len(fds), peak)
}

// commitObserver is told what the syncer committed to an edge store.
type commitObserver interface {
	applied(changes []store.Change, at time.Time)
	pruned(keys []objsync.Key, at time.Time)
}

// observedStore is the edge store as the syncer sees it, reporting each
// committed batch with the time Apply returned. The syncer takes its store
// as an interface, so the benchmarks observe commits exactly without
// polling and without changing the store or the syncer.
type observedStore struct {
	*store.Store
	obs commitObserver
}

func (s observedStore) Apply(ctx context.Context, changes []store.Change) error {
	if err := s.Store.Apply(ctx, changes); err != nil {
		return err
	}
	s.obs.applied(changes, time.Now())
	return nil
}

func (s observedStore) DeleteByKeyHash(ctx context.Context, hashes []uint64) ([]objsync.Key, error) {
	keys, err := s.Store.DeleteByKeyHash(ctx, hashes)
	if err == nil {
		s.obs.pruned(keys, time.Now())
	}
	return keys, err
}

// convergence follows an edge store towards wanted contents from the
// commits the syncer makes, and notes when it first matched.
type convergence struct {
	mu     sync.Mutex
	want   map[uint64]uint64 // key hash -> version hash
	have   map[uint64]uint64
	wrong  int    // keys whose entries in have and want differ
	ignore uint64 // a key hash whose commits are not followed (0: none)
	at     time.Time
	done   chan struct{}
}

// without returns m without key (nil stays nil).
func without(m map[uint64]uint64, key uint64) map[uint64]uint64 {
	if m == nil {
		return nil
	}
	out := maps.Clone(m)
	delete(out, key)
	return out
}

func newConvergence(want, have map[uint64]uint64) *convergence {
	c := &convergence{want: want, have: maps.Clone(have), done: make(chan struct{})}
	if c.have == nil {
		c.have = make(map[uint64]uint64)
	}
	for k := range want {
		c.wrong += c.differs(k)
	}
	for k := range c.have {
		if _, ok := want[k]; !ok {
			c.wrong++
		}
	}
	c.check(time.Now())
	return c
}

func (c *convergence) differs(key uint64) int {
	hv, has := c.have[key]
	wv, wants := c.want[key]
	if has != wants || hv != wv {
		return 1
	}
	return 0
}

func (c *convergence) set(key, version uint64, present bool) {
	if key == c.ignore && key != 0 {
		return
	}
	before := c.differs(key)
	if present {
		c.have[key] = version
	} else {
		delete(c.have, key)
	}
	c.wrong += c.differs(key) - before
}

func (c *convergence) check(at time.Time) {
	if c.wrong == 0 && c.at.IsZero() {
		c.at = at
		close(c.done)
	}
}

func (c *convergence) applied(changes []store.Change, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ch := range changes {
		r := ch.Object.Resource
		c.set(ch.Object.Key().Hash(), objsync.VersionHash(r.UID, ch.Object.Version), ch.Op != message.OpDelete)
	}
	c.check(at)
}

func (c *convergence) pruned(keys []objsync.Key, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range keys {
		c.set(k.Hash(), 0, false)
	}
	c.check(at)
}

func (c *convergence) converged() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

func (c *convergence) convergedAt() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.at
}

func (c *convergence) differing() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.wrong
}

// udpRelay forwards datagrams between QUIC clients and one server and
// counts them: the QUIC-level cost of a sync (UDP payloads: QUIC headers,
// TLS handshake, acks and retransmissions included; IP and UDP headers add
// 28 bytes per datagram on IPv4, not counted).
type udpRelay struct {
	ln     *net.UDPConn
	target *net.UDPAddr

	down, up         atomic.Int64 // bytes server→client, client→server
	downPkts, upPkts atomic.Int64
	// blocked, while set, drops every datagram uncounted: a blackholed
	// path.
	blocked atomic.Bool
	// byClass counts bytes per direction (0 down, 1 up) and datagram
	// class, for the breakdown of a reconnect's bytes.
	byClass [2][numDatagramClasses]atomic.Int64

	mu     sync.Mutex
	closed bool
	// traceLeft is how many more datagrams per direction (0 down, 1 up)
	// are described in traced (startTrace).
	traceLeft [2]int
	traced    []string
	peers     map[netip.AddrPort]*net.UDPConn // client -> socket towards the server
	wg        sync.WaitGroup
}

func startRelay(tb testing.TB, target string) *udpRelay {
	tb.Helper()
	taddr, err := net.ResolveUDPAddr("udp", target)
	require.NoError(tb, err)
	ln, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(tb, err)
	_ = ln.SetReadBuffer(4 << 20) // like quic-go's own sockets, so bursts are not dropped here
	r := &udpRelay{ln: ln, target: taddr, peers: make(map[netip.AddrPort]*net.UDPConn)}
	r.wg.Go(r.serve)
	tb.Cleanup(r.close)
	return r
}

func (r *udpRelay) addr() string { return r.ln.LocalAddr().String() }

func (r *udpRelay) classBytes() [2][numDatagramClasses]int64 {
	var out [2][numDatagramClasses]int64
	for d := range out {
		for c := range out[d] {
			out[d][c] = r.byClass[d][c].Load()
		}
	}
	return out
}

func (r *udpRelay) serve() {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := r.ln.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue
		}
		up := r.peer(from)
		if up == nil {
			return
		}
		if r.blocked.Load() {
			continue
		}
		r.up.Add(int64(n))
		r.upPkts.Add(1)
		r.byClass[1][classify(buf[:n])].Add(int64(n))
		r.trace(1, buf[:n])
		_, _ = up.Write(buf[:n])
	}
}

// peer returns the socket that relays from's datagrams to the server,
// opening it and its return path on first use; nil once the relay closed.
func (r *udpRelay) peer(from netip.AddrPort) *net.UDPConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.peers[from]; ok || r.closed {
		return c
	}
	c, err := net.DialUDP("udp", nil, r.target)
	if err != nil {
		return nil
	}
	_ = c.SetReadBuffer(4 << 20)
	r.peers[from] = c
	r.wg.Go(func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				continue // ECONNREFUSED from an ICMP error: the next datagram may pass
			}
			if r.blocked.Load() {
				continue
			}
			r.down.Add(int64(n))
			r.downPkts.Add(1)
			r.byClass[0][classify(buf[:n])].Add(int64(n))
			r.trace(0, buf[:n])
			_, _ = r.ln.WriteToUDPAddrPort(buf[:n], from)
		}
	})
	return c
}

// datagramClass is what a QUIC datagram starts with, read from its first
// byte without decrypting (RFC 9000, 17): a long-header packet's type, or
// a 1-RTT packet, split by size. A datagram may coalesce several packets
// (an Initial with a Handshake, a Handshake with a 1-RTT); it is counted
// under its first. 1-RTT datagrams above the 1,280 B quic-go starts with
// are path-MTU probes, or data once discovery has raised the size.
type datagramClass int

const (
	classInitial datagramClass = iota
	classZeroRTT
	classHandshake
	classOneRTT
	classOneRTTLarge // over 1,280 B
	numDatagramClasses
)

var datagramClassNames = [numDatagramClasses]string{"Initial", "0-RTT", "Handshake", "1-RTT", "1-RTT>1280"}

func classify(d []byte) datagramClass {
	switch {
	case len(d) == 0:
		return classOneRTT
	case d[0]&0x80 == 0: // short header
		if len(d) > 1280 {
			return classOneRTTLarge
		}
		return classOneRTT
	}
	switch (d[0] >> 4) & 3 { // QUIC v1 long packet types
	case 0:
		return classInitial
	case 1:
		return classZeroRTT
	default: // Handshake, and Retry (which this server does not send)
		return classHandshake
	}
}

// startTrace has the relay describe the next n datagrams in each
// direction, packet by packet, until takeTrace returns them.
func (r *udpRelay) startTrace(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.traceLeft, r.traced = [2]int{n, n}, nil
}

// takeTrace returns the datagrams described since startTrace, in the
// order the relay forwarded them, and stops tracing.
func (r *udpRelay) takeTrace() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.traced
	r.traceLeft, r.traced = [2]int{}, nil
	return out
}

func (r *udpRelay) trace(dir int, d []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.traceLeft[dir] == 0 {
		return
	}
	r.traceLeft[dir]--
	r.traced = append(r.traced, fmt.Sprintf("%s %d B: %s", [2]string{"down", "up"}[dir], len(d), describeDatagram(d)))
}

// describeDatagram lists the QUIC packets coalesced in one datagram with
// their sizes, read from the long headers without decrypting (RFC 9000,
// 17.2: a long-header packet states its length; a short-header packet
// fills the rest of the datagram).
func describeDatagram(d []byte) string {
	var parts []string
	for len(d) > 0 {
		if d[0]&0x80 == 0 {
			parts = append(parts, fmt.Sprintf("1-RTT %d", len(d)))
			break
		}
		n, ok := longPacketLen(d)
		if !ok {
			parts = append(parts, fmt.Sprintf("unparsed %d", len(d)))
			break
		}
		parts = append(parts, fmt.Sprintf("%s %d", [4]string{"Initial", "0-RTT", "Handshake", "Retry"}[(d[0]>>4)&3], n))
		d = d[n:]
	}
	return strings.Join(parts, " + ")
}

// longPacketLen returns the length of the long-header packet d starts
// with: header and payload.
func longPacketLen(d []byte) (int, bool) {
	i := 5        // first byte, version
	for range 2 { // destination and source connection ids
		if i >= len(d) {
			return 0, false
		}
		i += 1 + int(d[i])
	}
	typ := (d[0] >> 4) & 3
	if typ == 3 { // Retry: the rest
		return len(d), i <= len(d)
	}
	if typ == 0 { // Initial: token
		tl, n, ok := quicVarint(d, i)
		if !ok {
			return 0, false
		}
		i += n + int(tl)
	}
	l, n, ok := quicVarint(d, i)
	if !ok || i+n+int(l) > len(d) {
		return 0, false
	}
	return i + n + int(l), true
}

// quicVarint reads the variable-length integer at d[i:] (RFC 9000, 16).
func quicVarint(d []byte, i int) (v uint64, n int, ok bool) {
	if i >= len(d) {
		return 0, 0, false
	}
	n = 1 << (d[i] >> 6)
	if i+n > len(d) {
		return 0, 0, false
	}
	v = uint64(d[i] & 0x3f)
	for _, b := range d[i+1 : i+n] {
		v = v<<8 | uint64(b)
	}
	return v, n, true
}

func (r *udpRelay) close() {
	r.mu.Lock()
	r.closed = true
	_ = r.ln.Close()
	for _, c := range r.peers {
		_ = c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// benchConfigMap creates one ConfigMap.
func benchConfigMap(tb testing.TB, cs kubernetes.Interface, ns, name string) {
	_, err := cs.CoreV1().ConfigMaps(ns).Create(context.Background(), &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Data: map[string]string{"k": "v"},
	}, metav1.CreateOptions{})
	require.NoError(tb, err)
}

// benchPods creates the named pods on node, 32 at a time, and deletes them
// when tb ends: a namespace left Terminating keeps its pods, which every
// later catalog would list.
func benchPods(tb testing.TB, cs kubernetes.Interface, ns, node string, names []string, refs ...string) {
	tb.Helper()
	var g errgroup.Group
	g.SetLimit(32)
	for _, name := range names {
		g.Go(func() error {
			_, err := cs.CoreV1().Pods(ns).Create(context.Background(), podFor(ns, name, node, refs...), metav1.CreateOptions{})
			return err
		})
	}
	require.NoError(tb, g.Wait())
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		err := cs.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: new(int64)},
			metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
		if err != nil {
			tb.Errorf("delete pods of %s: %v", node, err)
		}
	})
}

// benchEdge starts an edge whose syncer reports its commits to obs, with
// production tunnel timings and the real clock: every start's Lease
// renewal is a new one and a Node status carries a new heartbeat, as in
// production, so what a start writes upstream (and what comes back down)
// is counted at its real cost.
func benchEdge(tb testing.TB, id identity, dataDir, cloudAddr string, obs commitObserver) *edge {
	tb.Helper()
	return startEdge(tb, id, dataDir, cloudAddr, edgeOptions{
		wrap:       func(st *store.Store) syncer.Store { return observedStore{Store: st, obs: obs} },
		nodeStatus: nodestatus.Config{Now: time.Now},
	})
}

// nopObserver ignores commits.
type nopObserver struct{}

func (nopObserver) applied([]store.Change, time.Time) {}
func (nopObserver) pruned([]objsync.Key, time.Time)   {}

// medianTraffic returns each field's median over samples, fields taken
// separately; the upper median for an even count.
func medianTraffic(samples []traffic) traffic {
	var byClass [2][numDatagramClasses]int64
	for d := range byClass {
		for c := range byClass[d] {
			byClass[d][c] = median(samples, func(t traffic) int64 { return t.byClass[d][c] })
		}
	}
	return traffic{
		byClass:  byClass,
		down:     median(samples, func(t traffic) float64 { return t.down }),
		up:       median(samples, func(t traffic) float64 { return t.up }),
		quicDown: median(samples, func(t traffic) int64 { return t.quicDown }),
		quicUp:   median(samples, func(t traffic) int64 { return t.quicUp }),
		objects:  median(samples, func(t traffic) float64 { return t.objects }),
		reads:    median(samples, func(t traffic) int64 { return t.reads }),
		converge: median(samples, func(t traffic) time.Duration { return t.converge }),
	}
}

func median[T cmp.Ordered](samples []traffic, field func(traffic) T) T {
	v := make([]T, len(samples))
	for i, s := range samples {
		v[i] = field(s)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

// percentile returns the nearest-rank percentile q (0..1] of sorted.
func percentile(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
