package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	cloudapp "github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/hub"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/common/message"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/opsprobe"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tunnel"
)

// haChildEnv names the JSON file of a haSpec; set, TestHACloudChild is a
// CloudCore replica.
const haChildEnv = "TETHER_E2E_HA_CHILD"

// haSpec tells a replica process where to listen and which CA Secret to
// share with the others.
type haSpec struct {
	KubeConfig string `json:"kubeconfig"`
	QUIC       string `json:"quic"`
	Join       string `json:"join"`
	Metrics    string `json:"metrics"`
	// Rebalance, when not zero, is the rebalancing period; Advertise the
	// replica's address for the others' hints.
	Rebalance time.Duration `json:"rebalance,omitempty"`
	Advertise string        `json:"advertise,omitempty"`
	CAName    string        `json:"caName"`
	Ready     string        `json:"ready"`
	// Autonomy, when set, turns offline autonomy on (haAutonomy).
	Autonomy *haAutonomy `json:"autonomy,omitempty"`
}

// haAutonomy is a replica's offline autonomy: its window, and the leader
// election Lease (its own per test) with its timings.
type haAutonomy struct {
	Window                                    time.Duration `json:"window"`
	Lease                                     string        `json:"lease"`
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

// TestHACloudChild is one CloudCore replica of TestHAFailover: the
// shipped wiring (cloudcore/app) in a process of its own, so that the
// test can SIGKILL it. It does nothing unless started by that test.
func TestHACloudChild(t *testing.T) {
	file := os.Getenv(haChildEnv)
	if file == "" {
		return
	}
	b, err := os.ReadFile(file)
	require.NoError(t, err)
	var spec haSpec
	require.NoError(t, json.Unmarshal(b, &spec))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	kc, err := clientcmd.BuildConfigFromFlags("", spec.KubeConfig)
	require.NoError(t, err)
	keepAlive, deadPeer := timingsOf(haTimings)
	cfg := cloudapp.Config{
		Kubernetes: kc, QUICAddr: spec.QUIC, JoinAddr: spec.Join, ServerSANs: []string{"127.0.0.1"},
		CAName: spec.CAName, KeepAlive: keepAlive, DeadPeerTimeout: deadPeer,
		VMs: cloudapp.VMConfig{Disabled: true}, Logger: testlog.New(),
		Registerer: prometheus.NewRegistry(), MetricsAddr: spec.Metrics,
		Rebalance: cloudapp.RebalanceConfig{Enabled: spec.Rebalance > 0, Address: spec.Advertise, Period: spec.Rebalance},
	}
	if au := spec.Autonomy; au != nil {
		cfg.OfflineAutonomy = au.Window
		cfg.Autonomy = cloudapp.AutonomyConfig{LeaseName: au.Lease, LeaseDuration: au.LeaseDuration, RenewDeadline: au.RenewDeadline, RetryPeriod: au.RetryPeriod}
	}
	a, err := cloudapp.New(ctx, cfg)
	require.NoError(t, err)
	require.NoError(t, a.Listen())
	require.NoError(t, os.WriteFile(spec.Ready, nil, 0o600))
	require.NoError(t, a.Run(ctx))
}

// haTimings are the tunnel timings of TestHAFailover's replicas and
// edges: a dead-peer timeout short enough for a quick test, long enough
// that a loaded machine does not end live sessions.
func haTimings(o *tunnel.Options) {
	o.KeepAlive, o.DeadPeerTimeout = 500*time.Millisecond, 4*time.Second
}

// replica is a CloudCore process of TestHAFailover.
type replica struct {
	name, dir string
	spec      haSpec
	runs      int
	cmd       *exec.Cmd
	exited    chan struct{}
}

// startReplicas starts n CloudCore processes on one CA Secret at once
// (the race to create the CA is part of what is tested) and waits until
// each is ready. rebalance, when not zero, is their rebalancing period,
// each advertising its own QUIC address. configure, when given, changes
// each replica's spec before it starts.
func startReplicas(t *testing.T, kubeconfig, caName string, n int, rebalance time.Duration, configure ...func(*haSpec)) []*replica {
	t.Helper()
	dir := t.TempDir()
	rs := make([]*replica, n)
	for i := range rs {
		name := fmt.Sprintf("replica-%d", i)
		quic := freeUDP(t)
		rs[i] = &replica{name: name, dir: dir, spec: haSpec{
			KubeConfig: kubeconfig, QUIC: quic, Join: freeTCPAddr(t), Metrics: freeTCPAddr(t), CAName: caName,
			Rebalance: rebalance,
		}}
		if rebalance > 0 {
			rs[i].spec.Advertise = "quic://" + quic
		}
		for _, c := range configure {
			c(&rs[i].spec)
		}
	}
	for _, r := range rs { // as close together as the machine allows
		r.launch(t)
	}
	for _, r := range rs {
		r.waitReady(t)
	}
	return rs
}

// launch starts the replica's process (again, after a kill: same
// addresses, a new identity).
func (r *replica) launch(t *testing.T) {
	t.Helper()
	r.runs++
	r.spec.Ready = filepath.Join(r.dir, fmt.Sprintf("%s.ready.%d", r.name, r.runs))
	b, err := json.Marshal(r.spec)
	require.NoError(t, err)
	specFile := filepath.Join(r.dir, r.name+".json")
	require.NoError(t, os.WriteFile(specFile, b, 0o600))
	log, err := os.OpenFile(filepath.Join(r.dir, r.name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(t, err)
	defer log.Close()
	r.cmd = exec.Command(os.Args[0], "-test.run=^TestHACloudChild$", "-test.count=1")
	r.cmd.Env = append(os.Environ(), haChildEnv+"="+specFile)
	r.cmd.Stdout, r.cmd.Stderr = log, log
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, r.cmd.Start())
	exited := make(chan struct{})
	r.exited = exited
	cmd := r.cmd
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() { _ = cmd.Process.Signal(syscall.SIGKILL); <-exited })
}

// waitReady waits until the replica serves: its informers synced and its
// listeners bound, so that an edge that starts at it stays there.
func (r *replica) waitReady(t *testing.T) {
	t.Helper()
	require.Eventually(t, func() bool {
		_, err := os.Stat(r.spec.Ready)
		select {
		case <-r.exited:
			return true
		default:
		}
		return err == nil
	}, 60*time.Second, 20*time.Millisecond, "%s did not start", r.name)
	select {
	case <-r.exited:
		t.Fatalf("%s exited at start:\n%s", r.name, r.logTail())
	default:
	}
	require.Eventually(t, func() bool {
		code, _, err := opsprobe.Get("http://" + r.spec.Metrics + "/readyz")
		return err == nil && code == http.StatusOK
	}, 60*time.Second, 50*time.Millisecond, "%s is not ready", r.name)
}

// metric reads one metric of the replica, summed over its labels, or NaN
// when it cannot tell.
func (r *replica) metric(name string) float64 {
	code, body, err := opsprobe.Get("http://" + r.spec.Metrics + "/metrics")
	if err != nil || code != http.StatusOK {
		return math.NaN()
	}
	var sum float64
	for line := range strings.Lines(body) {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(line[strings.LastIndexByte(line, ' ')+1:]), 64)
		if err != nil {
			return math.NaN()
		}
		sum += v
	}
	return sum
}

// kill sends SIGKILL and waits until the process is gone.
func (r *replica) kill() {
	_ = r.cmd.Process.Signal(syscall.SIGKILL)
	<-r.exited
}

func (r *replica) logTail() string {
	b, _ := os.ReadFile(filepath.Join(r.dir, r.name+".log"))
	lines := strings.Split(string(b), "\n")
	return strings.Join(lines[max(0, len(lines)-40):], "\n")
}

// sessions returns how many edge sessions the replica holds (its
// tunnel_sessions_active gauges, summed), or NaN when it cannot tell.
func (r *replica) sessions() float64 { return r.metric("tether_tunnel_sessions_active") }

// edgeValue reads a metric of an edge, summed over its labels, off the
// test's goroutine (require.Eventually): NaN, which no comparison
// accepts, when it cannot.
func edgeValue(e *edge, name string) float64 {
	v, err := promtest.Value(e.reg, name, nil)
	if err != nil {
		return math.NaN()
	}
	return v
}

// haShared is the ConfigMap every pod of the HA tests uses.
const haShared = "ha-shared"

// haCluster is the setup of the HA tests: three CloudCore replicas (child
// processes) started at once on a new CA Secret, the test's own catalog,
// and six edges, two on each replica, each holding its Node, two pods and
// the shared ConfigMap.
type haCluster struct {
	cs    kubernetes.Interface
	ns    string
	rs    []*replica
	nodes *edgenode.Client
	cat   *catalog.Catalog
	edges []*edge
	names []string
}

// newHA sets up an haCluster; rebalance is the replicas' rebalancing
// period (zero: off).
func newHA(t *testing.T, rebalance time.Duration) *haCluster {
	t.Helper()
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := t.Context()
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	require.NoError(t, os.WriteFile(kubeconfig, env.KubeConfig, 0o600))
	caName := fmt.Sprintf("ha-ca-%x", rand.Uint32())
	t.Cleanup(func() {
		_ = cs.CoreV1().Secrets(onboard.DefaultCANamespace).Delete(context.Background(), caName, metav1.DeleteOptions{})
	})

	rs := startReplicas(t, kubeconfig, caName, 3, rebalance)
	// Whoever won the race, every replica serves from the CA now in the
	// Secret: each edge below verifies it, and each replica holds edges.
	ca, err := onboard.EnsureCA(ctx, cs, onboard.DefaultCANamespace, caName, nil)
	require.NoError(t, err)
	admin := rest.CopyConfig(env.Config)
	admin.QPS, admin.Burst = 1000, 1000
	dyn, err := dynamic.NewForConfig(admin)
	require.NoError(t, err)
	nodes := edgenode.NewClient(dyn)

	// The test's own view of what each node must hold.
	cat, err := catalog.New(cs, catalog.Config{Logger: testlog.New()})
	require.NoError(t, err)
	catCtx, catStop := context.WithCancel(context.Background())
	catDone := make(chan error, 1)
	go func() { catDone <- cat.Run(catCtx) }()
	t.Cleanup(func() { catStop(); require.NoError(t, <-catDone) })
	require.NoError(t, cat.WaitForSync(ctx))

	const shared = haShared
	_, err = cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: shared, Namespace: ns}, Data: map[string]string{"v": "0"},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	addrs := make([]string, len(rs))
	for i, r := range rs {
		addrs[i] = "quic://" + r.spec.QUIC
	}
	const nEdges = 6
	edges := make([]*edge, nEdges)
	names := make([]string, nEdges)
	for i := range edges {
		name := uniqueNode(fmt.Sprintf("edge-ha%d", i))
		names[i] = name
		createEdgeNode(t, cs, name)
		createPods(t, cs, ns, name, name, 0, 2, shared)
		id := admitNode(t, nodes, ca, name)
		// Edge i starts at replica i mod 3: two edges on each.
		list := append(slices.Clone(addrs[i%len(addrs):]), addrs[:i%len(addrs)]...)
		edges[i] = startEdge(t, id, dataDir(t, name), "", edgeOptions{timings: haTimings, configure: func(c *edgeapp.Config) { c.Cloud = list }})
	}
	for i, e := range edges {
		waitConverged(t, cat, e.st, names[i], 4) // its Node, two pods, the ConfigMap
	}
	// Two edges on each replica: each edge is where its list starts (an
	// edge reaches a later replica only when every earlier one failed).
	for _, r := range rs {
		require.Eventually(t, func() bool { return r.sessions() == 2 }, 30*time.Second, 50*time.Millisecond,
			"%s does not hold two sessions", r.name)
	}
	return &haCluster{cs: cs, ns: ns, rs: rs, nodes: nodes, cat: cat, edges: edges, names: names}
}

// TestHAFailover: three CloudCore replicas start at once against one API
// server and one (new) CA Secret; six edges, each given all three
// addresses (two start at each replica). One replica is SIGKILLed while
// objects change and its edges write pod status: its two edges, and only
// they, reconnect to the other replicas and reconcile by digest; every
// edge ends with exactly the objects it must hold; every status write
// reaches the API server, the newest last, none applied after a newer
// one. Then `admin disable` of an edge closes its session on the replica
// that holds it, and no replica lets it back.
func TestHAFailover(t *testing.T) {
	h := newHA(t, 0)
	cs, ns, rs, nodes, cat, edges, names := h.cs, h.ns, h.rs, h.nodes, h.cat, h.edges, h.names
	ctx := t.Context()
	const shared = haShared
	opened := func(e *edge) float64 { return e.counter(t, "tether_tunnel_sessions_opened_total", nil) }
	for i, e := range edges {
		require.Equal(t, 1.0, opened(e), "edge %d has had one session", i)
	}

	// The replica that dies holds edges 0 and 3. They write pod status
	// across the failover, numbered, to the first of their pods.
	victims := []int{0, 3}
	watched := make(map[string][]int, len(victims)) // pod -> status numbers in the order the API server took them
	var mu sync.Mutex
	var watchers sync.WaitGroup
	wctx, wstop := context.WithCancel(ctx)
	defer func() { wstop(); watchers.Wait() }()
	for _, v := range victims {
		pod := names[v] + "-0000"
		w, err := cs.CoreV1().Pods(ns).Watch(wctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", pod).String()})
		require.NoError(t, err)
		watchers.Add(1)
		go func() {
			defer watchers.Done()
			defer w.Stop()
			for ev := range w.ResultChan() {
				p, ok := ev.Object.(*corev1.Pod)
				if !ok || ev.Type != watch.Modified {
					continue
				}
				if n, ok := strings.CutPrefix(p.Status.Message, "seq "); ok {
					seq, _ := strconv.Atoi(n)
					mu.Lock()
					if s := watched[pod]; len(s) == 0 || s[len(s)-1] != seq {
						watched[pod] = append(s, seq)
					}
					mu.Unlock()
				}
			}
		}()
	}
	dialFailures := make([]float64, len(edges)) // refusals before the whitelist saw the node count too
	for i, e := range edges {
		dialFailures[i] = e.counter(t, "tether_tunnel_dial_failures_total", nil)
	}
	const writes = 40
	publish := func(e *edge, node string, seq int) {
		b, err := json.Marshal(corev1.PodStatus{Phase: corev1.PodRunning, Message: fmt.Sprintf("seq %d", seq)})
		require.NoError(t, err)
		require.NoError(t, e.app.Syncer().Publish(ctx, store.OutboxItem{
			Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: ns, Name: node + "-0000"}, Data: b,
		}))
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var killedAt time.Time
	for seq := 1; seq <= writes; seq++ {
		<-tick.C
		for _, v := range victims {
			publish(edges[v], names[v], seq)
		}
		switch seq {
		case 10:
			rs[0].kill()
			killedAt = time.Now()
		case 12:
			// Objects change while the victims are away: the shared
			// ConfigMap, and a pod of each victim replaced by another.
			cm, err := cs.CoreV1().ConfigMaps(ns).Get(ctx, shared, metav1.GetOptions{})
			require.NoError(t, err)
			cm.Data["v"] = "1"
			_, err = cs.CoreV1().ConfigMaps(ns).Update(ctx, cm, metav1.UpdateOptions{})
			require.NoError(t, err)
			for _, v := range victims {
				require.NoError(t, cs.CoreV1().Pods(ns).Delete(ctx, names[v]+"-0001", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}))
				createPods(t, cs, ns, names[v], names[v], 2, 1, shared)
			}
		}
	}

	// The victims, and only they, open a second session: on another
	// replica (the dead one answers nothing).
	for _, v := range victims {
		require.Eventually(t, func() bool {
			return edgeValue(edges[v], "tether_tunnel_sessions_opened_total") >= 2
		}, 60*time.Second, 20*time.Millisecond, "edge %d did not reconnect: %v sessions, %v active", v,
			edgeValue(edges[v], "tether_tunnel_sessions_opened_total"), edgeValue(edges[v], "tether_tunnel_sessions_active"))
	}
	t.Logf("the killed replica's edges had new sessions %s after the kill (dead-peer timeout %s)",
		time.Since(killedAt).Round(10*time.Millisecond), func() time.Duration { _, d := timingsOf(haTimings); return d }())
	for _, v := range victims {
		// Each pass after a lost session starts at the next replica:
		// the dead one, tried first, would have cost a whole dial
		// timeout (5 s) before the edge moved on.
		require.Equal(t, dialFailures[v], edges[v].counter(t, "tether_tunnel_dial_failures_total", nil), "edge %d dialled the dead replica", v)
	}
	for i, e := range edges {
		waitConverged(t, cat, e.st, names[i], 4)
		if !slices.Contains(victims, i) && opened(e) != 1 {
			// Not a failure: a loaded machine can stretch a keepalive
			// past the dead-peer timeout.
			t.Logf("edge %d, on a replica that lives, reconnected too: %v sessions", i, opened(e))
		}
	}
	for _, v := range victims {
		e := edges[v]
		require.Eventually(t, func() bool {
			n, err := e.st.PendingCount(context.Background())
			return err == nil && n == 0
		}, 60*time.Second, 50*time.Millisecond, "edge %d's outbox drains: every status write answered", v)
		pod := names[v] + "-0000"
		require.Eventually(t, func() bool {
			p, err := cs.CoreV1().Pods(ns).Get(context.Background(), pod, metav1.GetOptions{})
			return err == nil && p.Status.Message == fmt.Sprintf("seq %d", writes)
		}, 30*time.Second, 50*time.Millisecond, "the newest status of %s is in the API server", pod)
		mu.Lock()
		seen := slices.Clone(watched[pod])
		mu.Unlock()
		require.True(t, slices.IsSorted(seen), "status of %s went back to an older write: %v", pod, seen)
		require.Equal(t, writes, seen[len(seen)-1])
	}

	// Revocation reaches the replica that holds the session, whichever
	// it is, and no replica lets the node back.
	revoked := edges[1]
	en, err := nodes.Get(ctx, names[1])
	require.NoError(t, err)
	en.Spec.Allowed = false
	_, err = nodes.Update(ctx, en)
	require.NoError(t, err)
	active := func() float64 { return revoked.counter(t, "tether_tunnel_sessions_active", nil) }
	require.Eventually(t, func() bool { return edgeValue(revoked, "tether_tunnel_sessions_active") == 0 }, 30*time.Second, 20*time.Millisecond, "the disabled edge's session closes")
	failures := revoked.counter(t, "tether_tunnel_dial_failures_total", nil)
	require.Eventually(t, func() bool {
		return edgeValue(revoked, "tether_tunnel_dial_failures_total") >= failures+4
	}, 60*time.Second, 20*time.Millisecond, "the disabled edge keeps trying")
	require.Zero(t, active(), "no replica let the disabled edge back")
	require.Equal(t, 1.0, opened(revoked), "no new session for the disabled edge")
	for _, r := range rs[1:] {
		select {
		case <-r.exited:
			t.Fatalf("%s exited:\n%s", r.name, r.logTail())
		default:
		}
	}
}

// TestHARebalance: with rebalancing on (a short period), six edges two
// per replica; one replica is killed and its two edges go to the others;
// when it returns (same address, a new process) the others move edges to
// it with goodbyes hinting at it, and the spread is two per replica
// again. Then it stays so: further rounds, seen in every replica's Lease,
// move nothing.
func TestHARebalance(t *testing.T) {
	const period = 500 * time.Millisecond
	h := newHA(t, period)
	rs := h.rs
	moves := func() float64 {
		var sum float64
		for _, r := range rs {
			sum += r.metric("tether_hub_rebalance_moves_total")
		}
		return sum
	}
	// While the edges came up one by one the replicas may already have
	// moved some (counts published during the ramp); from here on only
	// the failover and the return change anything.
	base := moves()

	rs[0].kill()
	require.Eventually(t, func() bool { return rs[1].sessions()+rs[2].sessions() == 6 }, 60*time.Second, 50*time.Millisecond,
		"the killed replica's edges fail over")

	rs[0].launch(t)
	rs[0].waitReady(t)
	for _, r := range rs {
		require.Eventually(t, func() bool { return r.sessions() == 2 }, 60*time.Second, 50*time.Millisecond,
			"%s does not hold two sessions again", r.name)
	}
	moved := moves()
	require.GreaterOrEqual(t, moved-base, 2.0, "the two edges came back by goodbyes")
	t.Logf("%v goodbyes brought the spread back to 2/2/2 (%v during the ramp)", moved-base, base)

	// Three more rounds of every replica (their Leases renewed three
	// times more) move nothing: no oscillation.
	leases := func() map[string]time.Time {
		l, err := h.cs.CoordinationV1().Leases(onboard.DefaultCANamespace).List(t.Context(),
			metav1.ListOptions{LabelSelector: hub.ReplicaLabel + "=" + hub.ReplicaLabelValue})
		require.NoError(t, err)
		out := map[string]time.Time{}
		for _, x := range l.Items {
			if x.Spec.RenewTime != nil && time.Since(x.Spec.RenewTime.Time) < 3*period+5*time.Second {
				out[x.Name] = x.Spec.RenewTime.Time
			}
		}
		return out
	}
	before := leases()
	require.GreaterOrEqual(t, len(before), 3)
	require.Eventually(t, func() bool {
		now := leases()
		for name, t0 := range before {
			if t1, ok := now[name]; ok && t1.Sub(t0) < 3*period {
				return false
			}
		}
		return true
	}, 60*time.Second, 100*time.Millisecond, "the replicas keep publishing")
	require.Equal(t, moved, moves(), "no further moves")
	for _, r := range rs {
		require.Equal(t, 2.0, r.sessions(), r.name)
	}
}

func freeTCPAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	return addr
}
