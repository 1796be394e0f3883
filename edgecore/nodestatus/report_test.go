package nodestatus

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
)

// recorder publishes into a real store and keeps every Node it was given,
// in order (the outbox keeps only the newest per object).
type recorder struct {
	st    *store.Store
	mu    sync.Mutex
	nodes []corev1.Node
	ops   []message.Op
}

func (r *recorder) Publish(ctx context.Context, it store.OutboxItem) error {
	if _, err := r.st.Enqueue(ctx, it); err != nil {
		return err
	}
	if it.Resource.Kind != "Node" {
		return nil
	}
	var n corev1.Node
	if err := json.Unmarshal(it.Data, &n); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nodes = append(r.nodes, n)
	r.ops = append(r.ops, it.Op)
	return nil
}

// last returns the last Node published and its op.
func (r *recorder) last() (corev1.Node, message.Op, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.nodes) == 0 {
		return corev1.Node{}, 0, false
	}
	return r.nodes[len(r.nodes)-1], r.ops[len(r.ops)-1], true
}

func readyOf(n corev1.Node) corev1.NodeCondition {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c
		}
	}
	return corev1.NodeCondition{}
}

// syntheticHost writes a /proc, /sys and /etc tree of a 6-CPU, 16000 MiB
// host with 512 huge pages of 2 MiB.
func syntheticHost(t *testing.T) string {
	root := t.TempDir()
	for p, content := range map[string]string{
		"sys/devices/system/cpu/online": "0-5\n",
		"proc/meminfo":                  "MemTotal: 16384000 kB\nMemFree: 1 kB\n",
		"sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages":    "512\n",
		"sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages": "0\n",
		"proc/sys/kernel/osrelease":                                "6.12.0-1-amd64\n",
		"etc/os-release":                                           "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n",
		"etc/machine-id":                                           "3d1219c7c4c5404aaa1f6d2a48adfda4\n",
		"sys/class/dmi/id/product_uuid":                            "4c4c4544-0042-3510-8052-b4c04f384d32\n",
		"proc/sys/kernel/random/boot_id":                           "a6b4ef2e-2d7a-4a8e-9a3b-0c1f6b5d2e11\n",
	} {
		full := filepath.Join(root, p)
		require.NoError(t, os.MkdirAll(filepath.Dir(full), 0o755))
		require.NoError(t, os.WriteFile(full, []byte(content), 0o644))
	}
	return root
}

// TestNodeReportsHost: the registered Node carries the host's facts read
// below HostRoot (before: empty nodeInfo, runtime.NumCPU and no storage or
// huge pages), allocatable less the reservations and kubelet's eviction
// defaults, and, with a runtime required but none configured, NotReady
// (before: Ready whatever could run).
func TestNodeReportsHost(t *testing.T) {
	st, _ := openStore(t)
	pub := &recorder{st: st}
	dataDir := t.TempDir()
	r, err := New(Config{
		Node: "edge-1", HostRoot: syntheticHost(t), DataDir: dataDir, RequireRuntime: true,
		SystemReserved: list("cpu", "500m", "memory", "500Mi"), KubeReserved: list("memory", "200Mi"),
		LeaseDuration: time.Hour, StatusEvery: time.Hour,
	}, pub, nil)
	require.NoError(t, err)
	stop, _ := start(t, r)
	require.Eventually(t, func() bool { _, op, ok := pub.last(); return ok && op == message.OpUpsert }, 10*time.Second, 5*time.Millisecond)
	require.NoError(t, stop())

	n, _, _ := pub.last()
	require.Equal(t, corev1.NodeSystemInfo{
		MachineID: "3d1219c7c4c5404aaa1f6d2a48adfda4", SystemUUID: "4c4c4544-0042-3510-8052-b4c04f384d32",
		BootID: "a6b4ef2e-2d7a-4a8e-9a3b-0c1f6b5d2e11", KernelVersion: "6.12.0-1-amd64", OSImage: "Debian GNU/Linux 13 (trixie)",
		KubeletVersion: KubeletVersion, OperatingSystem: runtime.GOOS, Architecture: runtime.GOARCH,
	}, n.Status.NodeInfo)
	storage := n.Status.Capacity[corev1.ResourceEphemeralStorage]
	require.Positive(t, storage.Value(), "the data directory's filesystem")
	// 16384000 KiB = 16000 MiB; huge pages 1 GiB.
	requireSameResources(t, list("cpu", "6", "memory", "16000Mi", "ephemeral-storage", storage.String(), "pods", "110",
		"hugepages-2Mi", "1Gi", "hugepages-1Gi", "0"), n.Status.Capacity)
	wantStorage := storage.DeepCopy()
	wantStorage.Sub(*resourceFraction(storage, 10))
	requireSameResources(t, list("cpu", "5500m", "memory", "14176Mi", "ephemeral-storage", wantStorage.String(), "pods", "110",
		"hugepages-2Mi", "1Gi", "hugepages-1Gi", "0"), n.Status.Allocatable)
	c := readyOf(n)
	require.Equal(t, corev1.ConditionFalse, c.Status)
	require.Equal(t, ReasonRuntimeUnreachable, c.Reason)
	require.Equal(t, "no container runtime is configured", c.Message)
}

// TestNewRefusesBadConfig: host facts that cannot be read and bad
// reservations or thresholds fail New with the reason.
func TestNewRefusesBadConfig(t *testing.T) {
	_, err := New(Config{Node: "a", HostRoot: t.TempDir()}, nil, nil)
	require.ErrorContains(t, err, "read host facts")
	_, err = New(Config{Node: "a", HostRoot: syntheticHost(t), DataDir: filepath.Join(t.TempDir(), "absent")}, nil, nil)
	require.ErrorContains(t, err, "read ephemeral storage")
	_, err = New(Config{Node: "a", HostRoot: syntheticHost(t), SystemReserved: list("pods", "1")}, nil, nil)
	require.ErrorContains(t, err, "only cpu, memory and ephemeral-storage")
	_, err = New(Config{Node: "a", HostRoot: syntheticHost(t), EvictionHard: map[string]string{"pid.available": "10"}}, nil, nil)
	require.ErrorContains(t, err, "not supported")
}

// lateRuntime is the runtime wired after the reporter started: until set
// it answers like an unreachable one; then a real containerd answers.
type lateRuntime struct{ p atomic.Pointer[CRI] }

func (l *lateRuntime) RuntimeStatus(ctx context.Context) (RuntimeState, error) {
	c := l.p.Load()
	if c == nil {
		return RuntimeState{}, errors.New("dial unix /run/containerd.sock: connect: no such file or directory")
	}
	return c.RuntimeStatus(ctx)
}

// TestReadyFollowsRuntime runs the reporter against a real containerd
// (CRI v1): NotReady while the runtime does not answer, Ready with
// containerRuntimeVersion containerd://1.6.20~ds1 at the next lease renewal
// after it does (StatusEvery is an hour: the change is published without
// waiting for it), NetworkNotReady when CNI is required and containerd has
// no CNI config, and NotReady again once containerd is stopped.
func TestReadyFollowsRuntime(t *testing.T) {
	st, _ := openStore(t)
	pub := &recorder{st: st}
	rt := &lateRuntime{}
	r, err := New(Config{Node: "edge-1", Runtime: rt, LeaseDuration: 2 * time.Second, StatusEvery: time.Hour, Registerer: prometheus.NewRegistry()}, pub, nil)
	require.NoError(t, err)
	stop, _ := start(t, r)
	defer func() { require.NoError(t, stop()) }()
	waitReady := func(status corev1.ConditionStatus, reason string) corev1.Node {
		t.Helper()
		var n corev1.Node
		require.Eventually(t, func() bool {
			var ok bool
			n, _, ok = pub.last()
			return ok && readyOf(n).Status == status && readyOf(n).Reason == reason
		}, 30*time.Second, 10*time.Millisecond, "Ready=%s %s published; last: %+v", status, reason, readyOf(n))
		return n
	}
	n := waitReady(corev1.ConditionFalse, ReasonRuntimeUnreachable)
	since := readyOf(n).LastTransitionTime
	require.Contains(t, readyOf(n).Message, "no such file or directory")
	require.Empty(t, n.Status.NodeInfo.ContainerRuntimeVersion)
	require.Zero(t, testutil.ToFloat64(r.readyGauge))

	host := containerd.Start(t)
	rt.p.Store(&CRI{Service: host.Runtime})
	n = waitReady(corev1.ConditionTrue, ReasonReady)
	v, err := host.Runtime.Version(t.Context(), "v1")
	require.NoError(t, err)
	version := v.GetRuntimeName() + "://" + v.GetRuntimeVersion()
	require.Regexp(t, `^containerd://1\.6\.20`, version, "Debian's containerd says 1.6.20~ds1")
	require.Equal(t, version, n.Status.NodeInfo.ContainerRuntimeVersion)
	require.Equal(t, "edgecore is posting ready status; container runtime "+version+" is ready", readyOf(n).Message)
	require.Equal(t, 1.0, testutil.ToFloat64(r.readyGauge))
	// Node times travel with second precision: not before, maybe equal.
	require.False(t, readyOf(n).LastTransitionTime.Time.Before(since.Time), "the transition is dated")

	// The same containerd, with CNI required: it has no CNI config.
	state, err := (&CRI{Service: host.Runtime}).RuntimeStatus(t.Context())
	require.NoError(t, err)
	got := ready(true, state, nil, false, true)
	require.Equal(t, corev1.ConditionFalse, got.status)
	require.Equal(t, ReasonNetworkNotReady, got.reason)
	require.Contains(t, got.message, "cni")

	require.NoError(t, host.Stop())
	n = waitReady(corev1.ConditionFalse, ReasonRuntimeUnreachable)
	require.Equal(t, version, n.Status.NodeInfo.ContainerRuntimeVersion, "the last version answered is kept")
}
