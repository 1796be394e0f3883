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
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/pki"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/tests/containerd"
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
		NodeStatus: nodestatus.Config{LeaseDuration: lease, MemoryBytes: 4 << 30},
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
// cloud address addr, containerd endpoint and Lease duration.
func writeEdgeFiles(t *testing.T, dir string, id identity, addr, endpoint string, lease time.Duration) {
	t.Helper()
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

// startEdgeProc starts EdgeCore as a child process on dir; it is killed
// when t ends, and its log's tail is printed if t failed.
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
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("EdgeCore process log (%s):\n%s", dir, tail(filepath.Join(dir, fileLog), 60))
		}
	})
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
// tests/netproxy), EdgeCore is killed with SIGKILL and so are its pods'
// processes: one pod's container, and the other pod whole (its sandbox's
// pause process and its container), as a power cut would. EdgeCore
// started again, the cloud still unreachable, brings both pods back from
// its SQLite store (a new container each, a new sandbox for the second,
// seen through containerd's CRI) without a single datagram reaching the
// cloud; once the path heals the API server shows them Running and Ready
// with restartCount 1. Then EdgeCore alone is killed and started again:
// it adopts what runs, restarts nothing (same container ids and start
// times, no new container) and the API server's restartCount stays 1.
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

	// The cloud becomes unreachable; CloudCore sees the session end.
	px.Partition(true)
	require.Eventually(t, func() bool { return !slices.Contains(c.app.Connected(), node) }, 30*time.Second, 20*time.Millisecond)

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

	// EdgeCore alone dies and starts again: adoption, not restart.
	counts := map[string]int{}
	for _, name := range names {
		counts[name] = containerCount(t, h, uids[name])
	}
	edge.kill()
	edge = startEdgeProc(t, dir)
	// Each pod synced at least twice by the new process (the relist is
	// every second): the first sync is the one that would have restarted.
	require.Eventually(t, func() bool {
		v, err := edge.value("tether_pods_syncs_total", map[string]string{"result": "ok"})
		return err == nil && v >= float64(2*len(names))
	}, 60*time.Second, 50*time.Millisecond, "the restarted EdgeCore syncs its pods")
	require.Eventually(t, func() bool { return slices.Contains(c.app.Connected(), node) }, 30*time.Second, 20*time.Millisecond)
	for _, name := range names {
		r, ok := runningContainer(ctx, h, uids[name])
		require.True(t, ok, "pod %s still runs", name)
		require.Equal(t, second[name], r, "pod %s: the same container, started at the same time, not restarted", name)
		require.Equal(t, counts[name], containerCount(t, h, uids[name]), "pod %s: no container created", name)
		require.True(t, podRunningAs(ctx, cs, ns, name, r, 1), "pod %s: restartCount unchanged in the API server", name)
	}
}
