package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
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

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/cloudcore/autonomy"
	"github.com/tetheredge/tether/common/pki"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/netproxy"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/testlog"
)

// offlineChildEnv names the data directory of the EdgeCore process that
// TestOfflineEdgeChild runs.
const offlineChildEnv = "TETHER_E2E_OFFLINE_CHILD"

// Files of an offline child's data directory, written by writeEdgeFiles.
const (
	fileAddr       = "addr"       // the cloud's QUIC address (the proxy's)
	fileNode       = "node"       // the node name
	fileContainerd = "containerd" // containerd's CRI endpoint
	fileLease      = "lease"      // the Lease duration (a Go duration)
	fileMetrics    = "metrics.sock"
	fileCRI        = "cri.sock"
	fileLog        = "edgecore.log"
)

// childStatusEvery is how often the child reports its Node's status
// (default a minute), so that a test sees several reports.
const childStatusEvery = 2 * time.Second

// childBackoff is the child's first restart delay of a crashed container
// (kubelet's 10 s, shortened so the test does not wait it out).
const childBackoff = time.Second

// TestOfflineEdgeChild is the EdgeCore process of the offline tests: the
// shipped wiring (edgecore/app) with the in-process CRI shim in front of
// the test's private containerd and the pod manager driving it, on the
// identity and data directory the test prepared. It answers the value of
// one of its metrics on a unix socket in that directory (GET
// /?name=...&label=value). It does nothing unless started by a test.
func TestOfflineEdgeChild(t *testing.T) {
	dir := os.Getenv(offlineChildEnv)
	if dir == "" {
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	ctx = klog.NewContext(ctx, logr.Discard()) // cri-client logs through klog
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		require.NoError(t, err)
		return string(b)
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key"))
	require.NoError(t, err)
	block, _ := pem.Decode([]byte(read("ca.crt")))
	require.NotNil(t, block)
	ca, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	lease, err := time.ParseDuration(read(fileLease))
	require.NoError(t, err)
	keepAlive, deadPeer := timingsOf(testTimings)
	reg := promtest.NewRegistry()
	a, err := edgeapp.New(ctx, edgeapp.Config{
		Cloud: []string{"quic://" + read(fileAddr)}, Node: read(fileNode), Certificate: pair, CA: ca,
		IdentityDir: dir, DataDir: dir, KeepAlive: keepAlive, DeadPeerTimeout: deadPeer,
		NodeStatus: nodestatus.Config{LeaseDuration: lease, StatusEvery: childStatusEvery, MemoryBytes: 4 << 30},
		CRI:        edgeapp.CRIConfig{Listen: filepath.Join(dir, fileCRI), Containerd: read(fileContainerd)},
		Pods: pods.Config{
			HostIPs: []string{"127.0.0.1"}, LogDir: filepath.Join(dir, "logs"),
			RelistPeriod: time.Second, BackoffBase: childBackoff,
		},
		Logger: testlog.New(), Registerer: reg,
	})
	require.NoError(t, err)
	ln, err := net.Listen("unix", filepath.Join(dir, fileMetrics))
	require.NoError(t, err)
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		want := map[string]string{}
		for k := range q {
			if k != "name" {
				want[k] = q.Get(k)
			}
		}
		v, err := promtest.Value(reg, q.Get("name"), want)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		fmt.Fprint(w, v)
	})}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	_ = a.Run(ctx)
	_ = a.Close()
}

// writeEdgeFiles prepares dir for an offline child: node identity id,
// cloud address addr, containerd endpoint and Lease duration. If t fails,
// the tail of the processes' log is printed.
func writeEdgeFiles(t *testing.T, dir string, id identity, addr, endpoint string, lease time.Duration) {
	t.Helper()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("EdgeCore processes' log (%s):\n%s", dir, tail(filepath.Join(dir, fileLog), 80))
		}
	})
	require.NoError(t, pki.WriteFiles(filepath.Join(dir, "node.crt"), id.cert.Leaf, filepath.Join(dir, "node.key"), id.key))
	require.NoError(t, pki.WriteFiles(filepath.Join(dir, "ca.crt"), id.ca, "", nil))
	for name, v := range map[string]string{fileAddr: addr, fileNode: id.node, fileContainerd: endpoint, fileLease: lease.String()} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(v), 0o600))
	}
}

// edgeProc is an EdgeCore process (TestOfflineEdgeChild) on a data
// directory.
type edgeProc struct {
	dir    string
	cmd    *exec.Cmd
	waited chan struct{}
	client *http.Client // to its metrics socket
}

// startEdgeProc starts EdgeCore as a child process on dir (prepared by
// writeEdgeFiles); it is killed when t ends.
func startEdgeProc(t *testing.T, dir string) *edgeProc {
	t.Helper()
	_ = os.Remove(filepath.Join(dir, fileMetrics)) // a killed predecessor's
	logf, err := os.OpenFile(filepath.Join(dir, fileLog), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	cmd := exec.Command(os.Args[0], "-test.run=^TestOfflineEdgeChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), offlineChildEnv+"="+dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	p := &edgeProc{dir: dir, cmd: cmd, waited: make(chan struct{})}
	go func() { _ = cmd.Wait(); _ = logf.Close(); close(p.waited) }()
	sock := filepath.Join(dir, fileMetrics)
	p.client = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	t.Cleanup(p.kill)
	return p
}

// kill sends SIGKILL and waits for the process to end.
func (p *edgeProc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.waited
}

// value reads one of the process's metrics (summed over series matching
// labels); an error until it serves them.
func (p *edgeProc) value(name string, labels map[string]string) (float64, error) {
	q := []string{"name=" + name}
	for k, v := range labels {
		q = append(q, k+"="+v)
	}
	resp, err := p.client.Get("http://edgecore/?" + strings.Join(q, "&"))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("metric %s: %s", name, b)
	}
	return strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// sleepyPod creates a host-network pod bound to node whose one container
// ("main", busybox, present locally) sleeps, restartPolicy Always.
func sleepyPod(t *testing.T, cs kubernetes.Interface, ns, name, node, image string) *corev1.Pod {
	t.Helper()
	grace := int64(1)
	p, err := cs.CoreV1().Pods(ns).Create(t.Context(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			NodeName: node, HostNetwork: true, TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{Name: "main", Image: image, ImagePullPolicy: corev1.PullNever, Command: []string{"sleep", "3600"}}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	return p
}

// running is the container a pod runs now, as the runtime says.
type running struct {
	id, sandbox string
	attempt     uint32
	startedAt   int64
}

// runningContainer returns the pod's running container in a ready
// sandbox (ok false if there is none), through the CRI of h.
func runningContainer(ctx context.Context, h *containerd.Host, uid string) (running, bool) {
	sel := map[string]string{"io.kubernetes.pod.uid": uid}
	sbs, err := h.Runtime.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{LabelSelector: sel, State: &runtimeapi.PodSandboxStateValue{State: runtimeapi.PodSandboxState_SANDBOX_READY}})
	if err != nil || len(sbs) != 1 {
		return running{}, false
	}
	cs, err := h.Runtime.ListContainers(ctx, &runtimeapi.ContainerFilter{PodSandboxId: sbs[0].Id, State: &runtimeapi.ContainerStateValue{State: runtimeapi.ContainerState_CONTAINER_RUNNING}})
	if err != nil || len(cs) != 1 {
		return running{}, false
	}
	st, err := h.Runtime.ContainerStatus(ctx, cs[0].Id, false)
	if err != nil {
		return running{}, false
	}
	return running{id: cs[0].Id, sandbox: sbs[0].Id, attempt: cs[0].Metadata.Attempt, startedAt: st.Status.StartedAt}, true
}

// containerCount is how many containers (any state) the runtime holds for
// the pod.
func containerCount(t *testing.T, h *containerd.Host, uid string) int {
	t.Helper()
	cs, err := h.Runtime.ListContainers(t.Context(), &runtimeapi.ContainerFilter{LabelSelector: map[string]string{"io.kubernetes.pod.uid": uid}})
	require.NoError(t, err)
	return len(cs)
}

// killProcess SIGKILLs the process behind a CRI verbose status (its
// info's pid): a container's or a sandbox's pause process.
func killProcess(t *testing.T, info map[string]string) {
	t.Helper()
	var v struct {
		Pid int `json:"pid"`
	}
	require.NoError(t, json.Unmarshal([]byte(info["info"]), &v))
	require.Positive(t, v.Pid)
	require.NoError(t, syscall.Kill(v.Pid, syscall.SIGKILL))
}

// podRunningAs reports whether the API server has the pod Running and
// Ready with its container running as r, restarted restarts times.
func podRunningAs(ctx context.Context, cs kubernetes.Interface, ns, name string, r running, restarts int32) bool {
	p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil || p.Status.Phase != corev1.PodRunning || len(p.Status.ContainerStatuses) != 1 {
		return false
	}
	c := p.Status.ContainerStatuses[0]
	return c.State.Running != nil && c.Ready && c.RestartCount == restarts && strings.HasSuffix(c.ContainerID, "://"+r.id) &&
		slices.ContainsFunc(p.Status.Conditions, func(pc corev1.PodCondition) bool {
			return pc.Type == corev1.PodReady && pc.Status == corev1.ConditionTrue
		})
}

// TestOfflineRestart: with the cloud unreachable (a partition on the path,
// tests/netproxy), CloudCore stands in (TetherConnected False, the offline
// taint) and, restarted meanwhile, keeps standing in. EdgeCore is killed
// with SIGKILL and so are its pods' processes: one pod's container, and
// the other pod whole (its sandbox's pause process and its container), as
// a power cut would. EdgeCore started again, the cloud still unreachable,
// brings both pods back from its SQLite store (a new container each, a new
// sandbox for the second, seen through containerd's CRI) without a single
// datagram reaching the cloud; once the path heals the API server shows
// them Running and Ready with restartCount 1, and the Node TetherConnected
// True, untainted. Then EdgeCore alone is killed and started again: it
// adopts what runs, restarts nothing (same container ids and start times,
// no new container), the API server's restartCount stays 1, and the edge's
// status reports leave TetherConnected in place.
func TestOfflineRestart(t *testing.T) {
	h := containerd.Start(t)
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := klog.NewContext(t.Context(), logr.Discard())
	node := uniqueNode("off-r")
	c := startCloud(t, env.Config, cloudOptions{timings: testTimings, offlineAutonomy: time.Hour})
	id := c.admit(t, node)
	px := netproxy.Start(t, c.addr, netproxy.Options{})
	dir := dataDir(t, node)
	writeEdgeFiles(t, dir, id, px.Addr().String(), h.Endpoint(), 40*time.Second)
	edge := startEdgeProc(t, dir)
	waitRegistered(t, cs, c, node)

	names := []string{"keep-sandbox", "lose-all"}
	uids := map[string]string{}
	for _, name := range names {
		uids[name] = string(sleepyPod(t, cs, ns, name, node, h.BusyboxImage).UID)
	}
	first := map[string]running{}
	require.Eventually(t, func() bool {
		for _, name := range names {
			r, ok := runningContainer(ctx, h, uids[name])
			if !ok || !podRunningAs(ctx, cs, ns, name, r, 0) {
				return false
			}
			first[name] = r
		}
		return true
	}, 90*time.Second, 100*time.Millisecond, "the pods run and the API server says so")

	// The cloud becomes unreachable; CloudCore sees the session end, and
	// once the Lease has not been renewed for half its duration (20 s
	// of the 40 s) it stands in: the Node says the site is offline and
	// is tainted.
	px.Partition(true)
	require.Eventually(t, func() bool { return !slices.Contains(c.app.Connected(), node) }, 30*time.Second, 20*time.Millisecond)
	offlineNode := func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		tc := conditionOf(n, autonomy.ConditionType)
		return err == nil && tc != nil && tc.Status == corev1.ConditionFalse && tc.Reason == autonomy.ReasonDisconnected && nodeTainted(n)
	}
	require.Eventually(t, offlineNode, 45*time.Second, 50*time.Millisecond, "the Node says TetherConnected False and is tainted offline")
	// CloudCore restarts meanwhile (on the same address): the new one
	// leads and stands in for the offline site, and the taint stays.
	c.stop()
	c = startCloud(t, env.Config, cloudOptions{quicAddr: c.addr, timings: testTimings, offlineAutonomy: time.Hour})
	c.counter(t, "tether_autonomy_offline_nodes", nil)
	require.Eventually(t, func() bool { return c.poll("tether_autonomy_offline_nodes", nil) == 1 }, 15*time.Second, 50*time.Millisecond,
		"the restarted CloudCore stands in for the offline site")
	require.True(t, offlineNode(), "the offline taint survives CloudCore's restart")

	// EdgeCore and the pods' processes die.
	edge.kill()
	st, err := h.Runtime.ContainerStatus(ctx, first["keep-sandbox"].id, true)
	require.NoError(t, err)
	killProcess(t, st.Info)
	st, err = h.Runtime.ContainerStatus(ctx, first["lose-all"].id, true)
	require.NoError(t, err)
	killProcess(t, st.Info)
	sb, err := h.Runtime.PodSandboxStatus(ctx, first["lose-all"].sandbox, true)
	require.NoError(t, err)
	killProcess(t, sb.Info)
	require.Eventually(t, func() bool {
		for _, name := range names {
			st, err := h.Runtime.ContainerStatus(ctx, first[name].id, false)
			if err != nil || st.Status.State != runtimeapi.ContainerState_CONTAINER_EXITED {
				return false
			}
		}
		sb, err := h.Runtime.PodSandboxStatus(ctx, first["lose-all"].sandbox, false)
		return err == nil && sb.Status.State == runtimeapi.PodSandboxState_SANDBOX_NOTREADY
	}, 30*time.Second, 50*time.Millisecond, "containerd sees the pods' processes dead")

	// EdgeCore again, the cloud still unreachable: every pod comes back
	// from the store.
	before := px.Stats()
	begin := time.Now()
	edge = startEdgeProc(t, dir)
	second := map[string]running{}
	require.Eventually(t, func() bool {
		for _, name := range names {
			r, ok := runningContainer(ctx, h, uids[name])
			if !ok || r.id == first[name].id {
				return false
			}
			second[name] = r
		}
		return true
	}, 60*time.Second, 50*time.Millisecond, "EdgeCore brings every pod back with the cloud unreachable")
	t.Logf("offline restart: both pods running again %s after EdgeCore started (restart back-off %s)", time.Since(begin).Round(10*time.Millisecond), childBackoff)
	require.Equal(t, first["keep-sandbox"].sandbox, second["keep-sandbox"].sandbox, "a live sandbox is kept")
	require.NotEqual(t, first["lose-all"].sandbox, second["lose-all"].sandbox, "a dead sandbox is replaced")
	for _, name := range names {
		require.Equal(t, uint32(1), second[name].attempt, "pod %s: its container's second instance", name)
	}
	after := px.Stats()
	require.Equal(t, before.Forwarded, after.Forwarded, "not one datagram reached the cloud: the pods came back from the store alone")
	require.Greater(t, after.Dropped, before.Dropped, "the new EdgeCore did try the cloud (its dials were dropped)")
	require.NotContains(t, c.app.Connected(), node)

	// The cloud is back: their status reaches the API server.
	px.Partition(false)
	begin = time.Now()
	require.Eventually(t, func() bool {
		for _, name := range names {
			if !podRunningAs(ctx, cs, ns, name, second[name], 1) {
				return false
			}
		}
		return true
	}, 60*time.Second, 100*time.Millisecond, "after the partition the API server has the pods Running, Ready, restartCount 1")
	t.Logf("offline restart: the API server had both pods' status %s after the path healed", time.Since(begin).Round(10*time.Millisecond))
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		tc := conditionOf(n, autonomy.ConditionType)
		return err == nil && tc != nil && tc.Status == corev1.ConditionTrue && !nodeTainted(n)
	}, 15*time.Second, 50*time.Millisecond, "the restarted CloudCore cleans up once the site is back: TetherConnected True, no offline taint")

	// EdgeCore alone dies and starts again: adoption, not restart.
	counts := map[string]int{}
	for _, name := range names {
		counts[name] = containerCount(t, h, uids[name])
	}
	edge.kill()
	restarted := metav1.NewTime(time.Now().Truncate(time.Second))
	edge = startEdgeProc(t, dir)
	// Each pod synced at least twice by the new process (the relist is
	// every second): the first sync is the one that would have restarted.
	require.Eventually(t, func() bool {
		v, err := edge.value("tether_pods_syncs_total", map[string]string{"result": "ok"})
		return err == nil && v >= float64(2*len(names))
	}, 60*time.Second, 50*time.Millisecond, "the restarted EdgeCore syncs its pods")
	// The new process's registration reached the Node (its Ready
	// heartbeat is newer than the restart) and CloudCore's TetherConnected
	// says True, the offline taint gone; a later status report of the
	// edge (every childStatusEvery) leaves the condition in place.
	var hb metav1.Time
	nodeSays := func(after metav1.Time) bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false
		}
		ready, tc := conditionOf(n, corev1.NodeReady), conditionOf(n, autonomy.ConditionType)
		if ready == nil || ready.LastHeartbeatTime.Before(&after) || tc == nil || tc.Status != corev1.ConditionTrue || nodeTainted(n) {
			return false
		}
		hb = ready.LastHeartbeatTime
		return true
	}
	require.Eventually(t, func() bool { return nodeSays(restarted) }, 30*time.Second, 50*time.Millisecond,
		"the restarted edge's Node is registered again and says TetherConnected True, untainted")
	later := metav1.NewTime(hb.Add(time.Second))
	require.Eventually(t, func() bool { return nodeSays(later) }, 30*time.Second, 50*time.Millisecond,
		"a later status report of the edge keeps TetherConnected True")
	for _, name := range names {
		r, ok := runningContainer(ctx, h, uids[name])
		require.True(t, ok, "pod %s still runs", name)
		require.Equal(t, second[name], r, "pod %s: the same container, started at the same time, not restarted", name)
		require.Equal(t, counts[name], containerCount(t, h, uids[name]), "pod %s: no container created", name)
		require.True(t, podRunningAs(ctx, cs, ns, name, r, 1), "pod %s: restartCount unchanged in the API server", name)
	}
}

// offlineHold is how long TestOfflineNoEviction keeps a site offline. An
// hour cannot be waited for, so the controller manager's timers are
// compressed instead (node monitor grace 5 s, default tolerations 2 s,
// against 50 s and 300 s upstream) and the site stays offline more than
// six times their sum: by the baseline's account a lost node is tainted
// after about 5 s and its pod evicted after about 7 s. Waiting it out is
// the point of the test, not a synchronisation.
const offlineHold = 45 * time.Second

// evictionReason is the Event reason the taint eviction controller gives a
// pod it deletes.
const evictionReason = "TaintManagerEviction"

// offlineWatch records, from informers on the API server (so that no
// state between two polls is missed), what would show the cloud giving up
// on an offline edge: its Node not Ready, or tainted by the node lifecycle
// controller (unreachable or not-ready, any effect); its pod deleted or
// given a deletionTimestamp; and, for every pod of the namespace, the
// taint eviction controller's eviction events.
type offlineWatch struct {
	node, pod string
	stop      func()

	mu           sync.Mutex
	violations   []string
	offlineTaint bool            // the Node carried autonomy.TaintOffline
	evictions    map[string]bool // pods with an eviction event
}

func watchOffline(t *testing.T, cs kubernetes.Interface, ns, node, pod string) *offlineWatch {
	t.Helper()
	w := &offlineWatch{node: node, pod: pod, evictions: map[string]bool{}}
	byName := func(name string) informers.SharedInformerOption {
		return informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + name })
	}
	nodes := informers.NewSharedInformerFactoryWithOptions(cs, 0, byName(node))
	podsOf := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(ns), byName(pod))
	events := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(ns))
	on := func(f func(obj any)) cache.ResourceEventHandlerFuncs {
		return cache.ResourceEventHandlerFuncs{AddFunc: f, UpdateFunc: func(_, obj any) { f(obj) }, DeleteFunc: f}
	}
	_, err := nodes.Core().V1().Nodes().Informer().AddEventHandler(on(func(obj any) {
		if n, ok := obj.(*corev1.Node); ok {
			w.sawNode(n)
		} else {
			w.violate("the Node was deleted")
		}
	}))
	require.NoError(t, err)
	_, err = podsOf.Core().V1().Pods().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { w.sawPod(obj) },
		UpdateFunc: func(_, obj any) { w.sawPod(obj) },
		DeleteFunc: func(any) { w.violate("the pod was deleted") },
	})
	require.NoError(t, err)
	_, err = events.Core().V1().Events().Informer().AddEventHandler(on(func(obj any) {
		// The taint eviction controller gives one reason to two events:
		// "Marking for deletion Pod ..." and "Cancelling deletion of Pod
		// ...". Only the first is an eviction; the second also follows a
		// not-ready taint a Node carries for a moment while it registers
		// (the informer lists the namespace's earlier events too).
		if e, ok := obj.(*corev1.Event); ok && e.Reason == evictionReason && strings.HasPrefix(e.Message, "Marking for deletion") {
			w.mu.Lock()
			w.evictions[e.InvolvedObject.Name] = true
			w.mu.Unlock()
		}
	}))
	require.NoError(t, err)
	stop := make(chan struct{})
	for _, f := range []informers.SharedInformerFactory{nodes, podsOf, events} {
		f.Start(stop)
		for typ, ok := range f.WaitForCacheSync(stop) {
			require.True(t, ok, "informer for %v synced", typ)
		}
	}
	w.stop = sync.OnceFunc(func() {
		close(stop)
		for _, f := range []informers.SharedInformerFactory{nodes, podsOf, events} {
			f.Shutdown()
		}
	})
	t.Cleanup(w.stop)
	return w
}

func (w *offlineWatch) violate(format string, args ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.violations = append(w.violations, time.Now().Format("15:04:05.000")+" "+fmt.Sprintf(format, args...))
}

func (w *offlineWatch) sawNode(n *corev1.Node) {
	if r := readyOf(n); r != corev1.ConditionTrue {
		w.violate("the Node's Ready is %q", r)
	}
	for _, tt := range n.Spec.Taints {
		switch {
		case tt.Key == corev1.TaintNodeUnreachable || tt.Key == corev1.TaintNodeNotReady:
			w.violate("the Node is tainted %s", tt.ToString())
		case tt.MatchTaint(&autonomy.TaintOffline):
			w.mu.Lock()
			w.offlineTaint = true
			w.mu.Unlock()
		}
	}
}

func (w *offlineWatch) sawPod(obj any) {
	if p, ok := obj.(*corev1.Pod); ok && p.DeletionTimestamp != nil {
		w.violate("the pod has a deletionTimestamp %s", p.DeletionTimestamp)
	}
}

// check returns the violations so far, whether the offline taint was
// seen, and whether pod had an eviction event.
func (w *offlineWatch) check(pod string) ([]string, bool, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.violations), w.offlineTaint, w.evictions[pod]
}

// nodeTainted reports whether the Node carries the offline taint.
func nodeTainted(n *corev1.Node) bool {
	return slices.ContainsFunc(n.Spec.Taints, func(tt corev1.Taint) bool { return tt.MatchTaint(&autonomy.TaintOffline) })
}

// TestOfflineNoEviction runs a real kube-controller-manager (node
// lifecycle and taint eviction, accelerated timers) over two edge sites
// and a third, plain Node whose Lease the test renews (with every node of
// the zone NotReady the controller would be in full disruption and evict
// nothing, which would prove nothing). Both sites lose the cloud at the
// same moment.
//
// Site A is the negative control: its CloudCore has offline autonomy off
// and its EdgeCore stops. Its Node turns Unknown, is tainted unreachable
// and its pod is evicted, with an eviction event.
//
// Site B has autonomy on. Its EdgeCore is a process of its own running a
// pod in a real containerd, and the path to its CloudCore is cut
// (tests/netproxy) for offlineHold: the edge goes on running, the cloud
// hears nothing. All that time, watched through informers, B's Node stays
// Ready and is never tainted unreachable or not-ready, its pod is never
// deleted, given a deletionTimestamp or an eviction event; B's Node says
// TetherConnected False and carries the offline NoSchedule taint. After the
// path heals the Node says TetherConnected True, the taint is gone, and
// the pod runs in the very same container (same id and start time, no
// other container), with restartCount 0 in the API server.
func TestOfflineNoEviction(t *testing.T) {
	h := containerd.Start(t)
	env := controlplane.Start(t, controlplane.WithControllerManager(controlplane.ControllerManager{}))
	cs := adminClient(t, env.Config)
	ctx := klog.NewContext(t.Context(), logr.Discard())
	ns := env.Namespace(t)

	healthy := "noevict-healthy"
	createHealthyNode(t, cs, healthy)
	stopRenew := renewEverySecond(t, cs, healthy)
	defer stopRenew()

	const lease = 4 * time.Second
	off := startCloud(t, env.Config, cloudOptions{timings: testTimings})
	on := startCloud(t, env.Config, cloudOptions{timings: testTimings, offlineAutonomy: time.Hour})
	idA, idB := off.admit(t, "noevict-a"), on.admit(t, "noevict-b")
	edgeA := startEdge(t, idA, dataDir(t, idA.node), off.addr, edgeOptions{timings: testTimings, nodeStatus: nodestatus.Config{LeaseDuration: lease, Now: time.Now}})
	px := netproxy.Start(t, on.addr, netproxy.Options{})
	dirB := dataDir(t, idB.node)
	writeEdgeFiles(t, dirB, idB, px.Addr().String(), h.Endpoint(), lease)
	startEdgeProc(t, dirB)
	waitRegistered(t, cs, off, idA.node)
	waitRegistered(t, cs, on, idB.node)
	zones := map[string]bool{}
	for _, name := range []string{healthy, idA.node, idB.node} {
		n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		zones[n.Labels[corev1.LabelTopologyZone]+"/"+n.Labels[corev1.LabelTopologyRegion]] = true
	}
	require.Len(t, zones, 1, "the three nodes are in one zone, so the healthy one keeps the zone out of full disruption")

	// A new Node is tainted not-ready (NoExecute too) until the node
	// lifecycle controller has seen it Ready; a pod bound to it before
	// then is marked for eviction and the mark cancelled, which is not
	// what this test is about.
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, idB.node, metav1.GetOptions{})
		return err == nil && readyOf(n) == corev1.ConditionTrue &&
			!slices.ContainsFunc(n.Spec.Taints, func(tt corev1.Taint) bool { return tt.Key == corev1.TaintNodeNotReady })
	}, 30*time.Second, 50*time.Millisecond, "site B's Node is Ready and the node lifecycle controller has removed its not-ready taints")
	podA := boundPod(t, cs, ns, idA.node)
	pB := sleepyPod(t, cs, ns, "on-"+idB.node, idB.node, h.BusyboxImage)
	requireShortToleration(t, pB)
	var r0 running
	require.Eventually(t, func() bool {
		var ok bool
		r0, ok = runningContainer(ctx, h, string(pB.UID))
		if !ok || !podRunningAs(ctx, cs, ns, pB.Name, r0, 0) {
			return false
		}
		n, err := cs.CoreV1().Nodes().Get(ctx, idB.node, metav1.GetOptions{})
		c := conditionOf(n, autonomy.ConditionType)
		return err == nil && readyOf(n) == corev1.ConditionTrue && c != nil && c.Status == corev1.ConditionTrue
	}, 90*time.Second, 100*time.Millisecond, "site B runs its pod, its Node Ready and TetherConnected True")
	w := watchOffline(t, cs, ns, idB.node, pB.Name)

	// Both sites lose the cloud.
	edgeA.stop()
	px.Partition(true)
	begin := time.Now()
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, idB.node, metav1.GetOptions{})
		c := conditionOf(n, autonomy.ConditionType)
		return err == nil && c != nil && c.Status == corev1.ConditionFalse && c.Reason == autonomy.ReasonDisconnected && nodeTainted(n)
	}, 15*time.Second, 100*time.Millisecond, "site B's Node says TetherConnected False and is tainted offline:NoSchedule")
	t.Logf("site B: TetherConnected=False and tainted %s after the path was cut", time.Since(begin).Round(100*time.Millisecond))
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, idA.node, metav1.GetOptions{})
		return err == nil && readyOf(n) == corev1.ConditionUnknown && unreachable(n)
	}, 30*time.Second, 100*time.Millisecond, "without autonomy the lost edge turns Unknown and is tainted unreachable")
	t.Logf("site A (baseline): Node Unknown and tainted unreachable %s after its EdgeCore stopped", time.Since(begin).Round(100*time.Millisecond))
	require.Eventually(t, func() bool { return evicted(ctx, cs, ns, podA) }, 30*time.Second, 100*time.Millisecond,
		"without autonomy the pod on the lost edge is evicted")
	t.Logf("site A (baseline): its pod evicted %s after its EdgeCore stopped", time.Since(begin).Round(100*time.Millisecond))

	// The hold: nothing may happen to site B.
	var what string
	if !assert.Never(t, func() bool {
		if v, _, _ := w.check(pB.Name); len(v) > 0 {
			what = strings.Join(v, "; ")
			return true
		}
		if r, ok := runningContainer(ctx, h, string(pB.UID)); !ok || r != r0 {
			what = fmt.Sprintf("the pod's container is not the one that ran before (%+v, was %+v)", r, r0)
			return true
		}
		return false
	}, offlineHold-time.Since(begin), 200*time.Millisecond) {
		t.Fatalf("with offline autonomy nothing may happen to an offline site, but %s after the path was cut: %s", time.Since(begin).Round(100*time.Millisecond), what)
	}
	t.Logf("site B: Ready, never tainted unreachable, its pod in place and running for %s offline (%.1f× node-monitor-grace + toleration)",
		time.Since(begin).Round(100*time.Millisecond), time.Since(begin).Seconds()/7)
	require.Positive(t, on.counter(t, "tether_autonomy_lease_renewals_total", nil), "CloudCore renewed the lease")

	// The path heals.
	px.Partition(false)
	begin = time.Now()
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, idB.node, metav1.GetOptions{})
		c := conditionOf(n, autonomy.ConditionType)
		return err == nil && c != nil && c.Status == corev1.ConditionTrue && c.Reason == autonomy.ReasonConnected && !nodeTainted(n)
	}, 30*time.Second, 50*time.Millisecond, "back online, site B's Node says TetherConnected True and the offline taint is gone")
	t.Logf("site B: TetherConnected=True and untainted %s after the path healed", time.Since(begin).Round(100*time.Millisecond))
	r, ok := runningContainer(ctx, h, string(pB.UID))
	require.True(t, ok)
	require.Equal(t, r0, r, "the same container, started at the same time: nothing restarted at the edge")
	require.Equal(t, 1, containerCount(t, h, string(pB.UID)), "no other container was created")
	require.True(t, podRunningAs(ctx, cs, ns, pB.Name, r0, 0), "the API server has the pod Running, Ready, restartCount 0")
	w.stop()
	violations, tainted, evictedB := w.check(pB.Name)
	require.Empty(t, violations)
	require.False(t, evictedB, "no eviction event for site B's pod")
	require.True(t, tainted, "the watch saw the offline taint")
	_, _, evictedA := w.check(podA)
	require.True(t, evictedA, "the watch saw the baseline pod's eviction event (the event check can fail)")
}
