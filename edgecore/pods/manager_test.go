package pods_test

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/promtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is a Publisher that keeps what was published.
type recorder struct {
	mu    sync.Mutex
	items []store.OutboxItem
}

func (r *recorder) Publish(_ context.Context, it store.OutboxItem) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.items = append(r.items, it)
	return nil
}

// status returns the last status published for the pod uid.
func (r *recorder) status(t *testing.T, uid string) (corev1.PodStatus, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := len(r.items) - 1; i >= 0; i-- {
		it := r.items[i]
		if it.Op == message.OpStatus && it.Resource.UID == uid {
			var st corev1.PodStatus
			assert.NoError(t, json.Unmarshal(it.Data, &st)) // off the test goroutine: no FailNow
			return st, true
		}
	}
	return corev1.PodStatus{}, false
}

// seen reports whether any status published for uid satisfied cond.
func (r *recorder) seen(t *testing.T, uid string, cond func(corev1.PodStatus) bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, it := range r.items {
		var st corev1.PodStatus
		if it.Op == message.OpStatus && it.Resource.UID == uid {
			require.NoError(t, json.Unmarshal(it.Data, &st))
			if cond(st) {
				return true
			}
		}
	}
	return false
}

func (r *recorder) deleted(uid string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, it := range r.items {
		if it.Op == message.OpDelete && it.Resource.UID == uid {
			return true
		}
	}
	return false
}

// env is one containerd, one store and a way to run managers on them.
type env struct {
	t   *testing.T
	ctx context.Context
	h   *containerd.Host
	st  *store.Store
	pub *recorder
	dir string
}

func newEnv(t *testing.T, opts ...containerd.Option) *env {
	h := containerd.Start(t, opts...)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 3*time.Minute)
	t.Cleanup(cancel)
	dir := t.TempDir()
	st, err := store.Open(ctx, filepath.Join(dir, "edgecore.db"), nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, st.Close()) })
	return &env{t: t, ctx: ctx, h: h, st: st, pub: &recorder{}, dir: dir}
}

// run starts a manager and returns a function that stops it and waits.
func (e *env) run(cfg pods.Config) (stop func()) {
	e.t.Helper()
	cfg.Node = "edge-1"
	cfg.HostIPs = []string{"192.0.2.10"}
	cfg.LogDir = filepath.Join(e.dir, "logs")
	cfg.RootDir = filepath.Join(e.dir, "pods")
	if cfg.RelistPeriod == 0 {
		cfg.RelistPeriod = 200 * time.Millisecond
	}
	m, err := pods.New(cfg, e.st, e.h.Runtime, e.h.Images, e.pub, nil)
	require.NoError(e.t, err)
	cancelSub := e.st.Subscribe(m.OnStoreChange)
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancelSub()
			cancel()
			require.NoError(e.t, <-done)
		})
	}
	e.t.Cleanup(stop)
	return stop
}

func (e *env) put(objs ...any) {
	e.t.Helper()
	var changes []store.Change
	for _, o := range objs {
		data, err := json.Marshal(o)
		require.NoError(e.t, err)
		var r message.Resource
		switch v := o.(type) {
		case *corev1.Pod:
			r = message.Resource{Version: "v1", Kind: "Pod", Namespace: v.Namespace, Name: v.Name, UID: string(v.UID)}
		case *corev1.Secret:
			r = message.Resource{Version: "v1", Kind: "Secret", Namespace: v.Namespace, Name: v.Name, UID: string(v.UID)}
		case *corev1.ConfigMap:
			r = message.Resource{Version: "v1", Kind: "ConfigMap", Namespace: v.Namespace, Name: v.Name, UID: string(v.UID)}
		}
		changes = append(changes, store.Change{Op: message.OpUpsert, Object: store.Object{Resource: r, Version: "1", Data: data}})
	}
	require.NoError(e.t, e.st.Apply(e.ctx, changes))
}

func (e *env) deletePod(p *corev1.Pod) {
	require.NoError(e.t, e.st.Apply(e.ctx, []store.Change{{Op: message.OpDelete, Object: store.Object{
		Resource: message.Resource{Kind: "Pod", Namespace: p.Namespace, Name: p.Name},
	}}}))
}

// waitStatus waits until the pod's published status satisfies cond.
func (e *env) waitStatus(p *corev1.Pod, what string, cond func(corev1.PodStatus) bool) corev1.PodStatus {
	e.t.Helper()
	// The condition runs on its own goroutine, which may still run when
	// Eventually gives up and formats the message.
	var last atomic.Pointer[corev1.PodStatus]
	last.Store(&corev1.PodStatus{})
	ok := assert.Eventuallyf(e.t, func() bool {
		st, ok := e.pub.status(e.t, string(p.UID))
		last.Store(&st)
		return ok && cond(st)
	}, time.Minute, 50*time.Millisecond, "pod %s: %s", p.Name, what)
	if !ok {
		e.t.Fatalf("pod %s: last status %+v", p.Name, last.Load())
	}
	return *last.Load()
}

func (e *env) containers(uid types.UID) []*runtimeapi.Container {
	cs, err := e.h.Runtime.ListContainers(e.ctx, &runtimeapi.ContainerFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(uid)},
	})
	require.NoError(e.t, err)
	return cs
}

func busyboxPod(h *containerd.Host, name string, policy corev1.RestartPolicy, hostNet bool, cmd ...string) *corev1.Pod {
	grace := int64(1)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name + "-1")},
		Spec: corev1.PodSpec{
			NodeName:                      "edge-1",
			HostNetwork:                   hostNet,
			RestartPolicy:                 policy,
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name: "main", Image: h.BusyboxImage, ImagePullPolicy: corev1.PullNever, Command: cmd,
			}},
		},
	}
}

func running(st corev1.PodStatus) bool {
	return st.Phase == corev1.PodRunning && len(st.ContainerStatuses) == 1 && st.ContainerStatuses[0].State.Running != nil
}

// A pod written into the store runs on the CNI network: its status reaches
// Running with the container's start time and the sandbox's IP, and its
// env holds a Secret key and fieldRefs.
func TestPodRunsWithEnv(t *testing.T) {
	e := newEnv(t, containerd.WithCNI())
	e.run(pods.Config{})
	p := busyboxPod(e.h, "web", corev1.RestartPolicyAlways, false, "sleep", "3600")
	c := &p.Spec.Containers[0]
	c.Env = []corev1.EnvVar{
		{Name: "PLAIN", Value: "v1"},
		{Name: "TOKEN", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
			LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}, Key: "token"}}},
		{Name: "MY_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
		{Name: "MY_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
		{Name: "MY_NODE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "creds", Namespace: "default", UID: "uid-creds"},
		Data: map[string][]byte{"token": []byte("s3cret")}}
	e.put(secret, p)

	st := e.waitStatus(p, "running", running)
	cs := st.ContainerStatuses[0]
	require.False(t, cs.State.Running.StartedAt.IsZero())
	require.True(t, cs.Ready)
	require.True(t, strings.HasPrefix(cs.ContainerID, "containerd://"), cs.ContainerID)
	require.NotEmpty(t, cs.ImageID)
	require.NotEmpty(t, st.PodIP)
	ip, err := netip.ParseAddr(st.PodIP)
	require.NoError(t, err)
	require.True(t, e.h.Network.Subnet.Contains(ip), "pod IP %s in %s", ip, e.h.Network.Subnet)
	require.Equal(t, "192.0.2.10", st.HostIP)
	require.NotNil(t, st.StartTime)
	for _, ct := range []corev1.PodConditionType{corev1.PodReady, corev1.ContainersReady, corev1.PodInitialized, corev1.PodScheduled, corev1.PodReadyToStartContainers} {
		require.Truef(t, hasCondition(st, ct, corev1.ConditionTrue), "condition %s in %+v", ct, st.Conditions)
	}

	id := strings.TrimPrefix(cs.ContainerID, "containerd://")
	out, _, err := e.h.Runtime.ExecSync(e.ctx, id, []string{"sh", "-c", "echo $PLAIN $TOKEN $MY_NAME $MY_IP $MY_NODE"}, 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, "v1 s3cret web "+st.PodIP+" edge-1\n", string(out))
}

func hasCondition(st corev1.PodStatus, t corev1.PodConditionType, s corev1.ConditionStatus) bool {
	for _, c := range st.Conditions {
		if c.Type == t {
			return c.Status == s
		}
	}
	return false
}

// An OnFailure container that exits 1 is restarted with back-off: the
// restart count climbs, the last state keeps exit code 1, and it waits in
// CrashLoopBackOff between restarts.
func TestOnFailureRestartsWithBackoff(t *testing.T) {
	e := newEnv(t)
	// A base long enough that the back-off outlasts the exit event's
	// settling on a loaded machine (else the next sync finds it over and
	// restarts at once, publishing no CrashLoopBackOff in between).
	e.run(pods.Config{BackoffBase: time.Second, BackoffMax: 2 * time.Second})
	p := busyboxPod(e.h, "crash", corev1.RestartPolicyOnFailure, true, "sh", "-c", "exit 1")
	e.put(p)

	st := e.waitStatus(p, "restartCount >= 3", func(st corev1.PodStatus) bool {
		if len(st.ContainerStatuses) != 1 {
			return false
		}
		cs := st.ContainerStatuses[0]
		return cs.RestartCount >= 3 && cs.LastTerminationState.Terminated != nil
	})
	require.True(t, e.pub.seen(t, string(p.UID), func(st corev1.PodStatus) bool {
		w := st.ContainerStatuses[0].State.Waiting
		return w != nil && w.Reason == "CrashLoopBackOff" && st.ContainerStatuses[0].LastTerminationState.Terminated != nil
	}), "no CrashLoopBackOff status published")
	require.Equal(t, corev1.PodRunning, st.Phase)
	require.Equal(t, int32(1), st.ContainerStatuses[0].LastTerminationState.Terminated.ExitCode)
	require.Equal(t, "Error", st.ContainerStatuses[0].LastTerminationState.Terminated.Reason)
	// Old instances are removed: the current one and the last dead one stay.
	require.LessOrEqual(t, len(e.containers(p.UID)), 2)
	// The back-off doubles: each instance was created no earlier than
	// base·2^step after the exit of the one before (step on the dead one).
	require.Eventually(t, func() bool { return len(e.criStatus(p.UID, "main")) == 2 }, time.Minute, 20*time.Millisecond)
	list := e.criStatus(p.UID, "main")
	newer, older := list[0], list[1]
	step, err := strconv.Atoi(older.Annotations["tether.io/backoff-step"])
	require.NoError(t, err)
	require.GreaterOrEqual(t, step, 2)
	want := min(100*time.Millisecond<<step, 400*time.Millisecond)
	require.GreaterOrEqual(t, time.Duration(newer.CreatedAt-older.FinishedAt), want,
		"attempt %d created %s after attempt %d exited", newer.Metadata.Attempt,
		time.Duration(newer.CreatedAt-older.FinishedAt), older.Metadata.Attempt)
}

// A Never container that exits 3 leaves the pod Failed with the exit code,
// and is not restarted.
func TestNeverFails(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{BackoffBase: 50 * time.Millisecond})
	p := busyboxPod(e.h, "once", corev1.RestartPolicyNever, true, "sh", "-c", "exit 3")
	e.put(p)
	st := e.waitStatus(p, "failed", func(st corev1.PodStatus) bool { return st.Phase == corev1.PodFailed })
	term := st.ContainerStatuses[0].State.Terminated
	require.NotNil(t, term)
	require.Equal(t, int32(3), term.ExitCode)
	require.Equal(t, int32(0), st.ContainerStatuses[0].RestartCount)
	require.Len(t, e.containers(p.UID), 1)
}

// A pod deleted from the store is stopped and its sandbox removed; a pod
// with a deletionTimestamp is too, and its deletion is published.
func TestDeletion(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{})
	gone := busyboxPod(e.h, "gone", corev1.RestartPolicyAlways, true, "sleep", "3600")
	term := busyboxPod(e.h, "term", corev1.RestartPolicyAlways, true, "sleep", "3600")
	e.put(gone, term)
	e.waitStatus(gone, "running", running)
	e.waitStatus(term, "running", running)

	e.deletePod(gone)
	now := metav1.Now()
	grace := int64(1)
	term.DeletionTimestamp, term.DeletionGracePeriodSeconds = &now, &grace
	e.put(term)

	require.Eventually(t, func() bool {
		sbs, err := e.h.Runtime.ListPodSandbox(e.ctx, nil)
		require.NoError(t, err)
		return len(sbs) == 0 && len(e.containers(gone.UID)) == 0 && len(e.containers(term.UID)) == 0
	}, time.Minute, 50*time.Millisecond)
	require.Eventually(t, func() bool { return e.pub.deleted(string(term.UID)) }, time.Minute, 50*time.Millisecond)
	require.False(t, e.pub.deleted(string(gone.UID)), "a pod the cloud removed needs no deletion")
}

// A new manager on the same store and runtime adopts the running container:
// same id, same start time, no restart.
func TestAdoptsRunningPods(t *testing.T) {
	e := newEnv(t)
	stop := e.run(pods.Config{})
	p := busyboxPod(e.h, "keep", corev1.RestartPolicyAlways, true, "sleep", "3600")
	e.put(p)
	before := e.waitStatus(p, "running", running).ContainerStatuses[0]
	stop()

	e.pub = &recorder{}
	e.run(pods.Config{})
	after := e.waitStatus(p, "running", running).ContainerStatuses[0]
	require.Equal(t, before.ContainerID, after.ContainerID)
	require.True(t, before.State.Running.StartedAt.Equal(&after.State.Running.StartedAt))
	require.Equal(t, int32(0), after.RestartCount)
	require.Len(t, e.containers(p.UID), 1)
}

// criStatus returns the CRI status of the pod's newest instance of the
// container name.
func (e *env) criStatus(uid types.UID, name string) []*runtimeapi.ContainerStatus {
	e.t.Helper()
	cs, err := e.h.Runtime.ListContainers(e.ctx, &runtimeapi.ContainerFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(uid), "io.kubernetes.container.name": name},
	})
	require.NoError(e.t, err)
	var out []*runtimeapi.ContainerStatus
	for _, c := range cs {
		resp, err := e.h.Runtime.ContainerStatus(e.ctx, c.Id, false)
		require.NoError(e.t, err)
		out = append(out, resp.Status)
	}
	slices.SortFunc(out, func(a, b *runtimeapi.ContainerStatus) int {
		return int(b.Metadata.Attempt) - int(a.Metadata.Attempt)
	})
	return out
}

// Init containers run one after the other, to completion, before the app
// container starts.
func TestInitContainersRunInOrder(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{})
	p := busyboxPod(e.h, "init", corev1.RestartPolicyAlways, true, "sleep", "3600")
	p.Spec.InitContainers = []corev1.Container{
		{Name: "first", Image: e.h.BusyboxImage, ImagePullPolicy: corev1.PullNever, Command: []string{"sleep", "1"}},
		{Name: "second", Image: e.h.BusyboxImage, ImagePullPolicy: corev1.PullNever, Command: []string{"true"}},
	}
	e.put(p)
	st := e.waitStatus(p, "running", running)
	require.True(t, hasCondition(st, corev1.PodInitialized, corev1.ConditionTrue))
	require.Len(t, st.InitContainerStatuses, 2)
	for _, ics := range st.InitContainerStatuses {
		require.NotNil(t, ics.State.Terminated, ics.Name)
		require.Equal(t, int32(0), ics.State.Terminated.ExitCode, ics.Name)
	}
	first, second, app := e.criStatus(p.UID, "first")[0], e.criStatus(p.UID, "second")[0], e.criStatus(p.UID, "main")[0]
	require.LessOrEqual(t, first.FinishedAt, second.StartedAt, "second started before first ended")
	require.LessOrEqual(t, second.FinishedAt, app.StartedAt, "app started before the init containers ended")
}

// Resources and the securityContext reach the container: cgroup values by
// kubelet's formulas, the user, a read-only root and capabilities.
func TestResourcesAndSecurityContext(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{})
	p := busyboxPod(e.h, "limits", corev1.RestartPolicyAlways, true, "sleep", "3600")
	c := &p.Spec.Containers[0]
	c.Resources = corev1.ResourceRequirements{
		Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("250m")},
		Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("500m"), corev1.ResourceMemory: resource.MustParse("64Mi")},
	}
	user := int64(65534)
	ro := true
	c.SecurityContext = &corev1.SecurityContext{
		RunAsUser: &user, ReadOnlyRootFilesystem: &ro,
		Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}, Add: []corev1.Capability{"NET_BIND_SERVICE"}},
	}
	e.put(p)
	st := e.waitStatus(p, "running", running)
	id := strings.TrimPrefix(st.ContainerStatuses[0].ContainerID, "containerd://")
	exec := func(cmd string) (string, error) { return e.sh(id, cmd) }
	for cmd, want := range map[string]string{
		"cat /sys/fs/cgroup/cpu/cpu.shares":               "256",
		"cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us":         "50000",
		"cat /sys/fs/cgroup/cpu/cpu.cfs_period_us":        "100000",
		"cat /sys/fs/cgroup/memory/memory.limit_in_bytes": "67108864",
		"id -u": "65534",
		"grep CapBnd /proc/self/status | cut -f2": "0000000000000400", // CAP_NET_BIND_SERVICE only (a non-root user has no effective ones)
	} {
		got, err := exec(cmd)
		require.NoError(t, err, cmd)
		require.Equal(t, want, got, cmd)
	}
	_, err := exec("touch /probe")
	require.Error(t, err, "the root filesystem is writable")
}

// A pod replaced by a new one of the same name (another UID) loses its
// sandbox; the new one runs.
func TestReplacedPodIsTornDown(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{})
	old := busyboxPod(e.h, "same", corev1.RestartPolicyAlways, true, "sleep", "3600")
	e.put(old)
	e.waitStatus(old, "running", running)
	next := busyboxPod(e.h, "same", corev1.RestartPolicyAlways, true, "sleep", "3600")
	next.UID = "uid-same-2"
	e.put(next)
	e.waitStatus(next, "running", running)
	require.Eventually(t, func() bool { return len(e.containers(old.UID)) == 0 }, time.Minute, 50*time.Millisecond)
	sbs, err := e.h.Runtime.ListPodSandbox(e.ctx, nil)
	require.NoError(t, err)
	require.Len(t, sbs, 1)
	require.Equal(t, string(next.UID), sbs[0].Metadata.Uid)
}

// events is an EventSource the test feeds.
type events chan pods.ContainerEvent

func (ev events) Events() <-chan pods.ContainerEvent { return ev }

// With the relist out of the way, an event about a container makes the
// manager look at its pod at once: the exit is reported.
func TestEventTriggersSync(t *testing.T) {
	e := newEnv(t)
	ev := make(events, 1)
	e.run(pods.Config{RelistPeriod: time.Hour, Events: ev})
	p := busyboxPod(e.h, "evented", corev1.RestartPolicyNever, true, "sh", "-c", "sleep 1; exit 4")
	e.put(p)
	st := e.waitStatus(p, "running", running)
	id := strings.TrimPrefix(st.ContainerStatuses[0].ContainerID, "containerd://")
	require.Eventually(t, func() bool {
		resp, err := e.h.Runtime.ContainerStatus(e.ctx, id, false)
		require.NoError(t, err)
		return resp.Status.State == runtimeapi.ContainerState_CONTAINER_EXITED
	}, time.Minute, 50*time.Millisecond)
	ev <- pods.ContainerEvent{ContainerID: id}
	st = e.waitStatus(p, "failed", func(st corev1.PodStatus) bool { return st.Phase == corev1.PodFailed })
	require.Equal(t, int32(4), st.ContainerStatuses[0].State.Terminated.ExitCode)
}

// A stored pod that does not decode is counted and left alone; the other
// pods run.
func TestBadPodIsCounted(t *testing.T) {
	e := newEnv(t)
	reg := promtest.NewRegistry()
	e.run(pods.Config{Registerer: reg})
	require.NoError(t, e.st.Apply(e.ctx, []store.Change{{Op: message.OpUpsert, Object: store.Object{
		Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "default", Name: "bad", UID: "uid-bad"},
		Version:  "1", Data: []byte(`{"spec":{"containers":"not a list"}}`),
	}}}))
	good := busyboxPod(e.h, "good", corev1.RestartPolicyAlways, true, "sleep", "3600")
	e.put(good)
	e.waitStatus(good, "running", running)
	require.Eventually(t, func() bool {
		v, err := promtest.Value(reg, "tether_pods_bad_objects_total", nil)
		return err == nil && v >= 1
	}, time.Minute, 50*time.Millisecond)
	_, ok := e.pub.status(t, "uid-bad")
	require.False(t, ok)
}

// Probes: a startup probe gates Started, a readiness probe flips Ready both
// ways, and a failed liveness probe restarts the container.
func TestProbes(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{BackoffBase: 100 * time.Millisecond, ProbeTick: 50 * time.Millisecond})
	p := busyboxPod(e.h, "probed", corev1.RestartPolicyAlways, true, "sh", "-c", "touch /tmp/ready /tmp/alive; exec sleep 3600")
	exec := func(file string) *corev1.Probe {
		return &corev1.Probe{PeriodSeconds: 1, FailureThreshold: 1, ProbeHandler: corev1.ProbeHandler{
			Exec: &corev1.ExecAction{Command: []string{"test", "-f", file}}}}
	}
	c := &p.Spec.Containers[0]
	c.StartupProbe, c.ReadinessProbe, c.LivenessProbe = exec("/tmp/alive"), exec("/tmp/ready"), exec("/tmp/alive")
	e.put(p)

	ready := func(want bool) func(corev1.PodStatus) bool {
		return func(st corev1.PodStatus) bool {
			if !running(st) {
				return false
			}
			cs := st.ContainerStatuses[0]
			cond := corev1.ConditionFalse
			if want {
				cond = corev1.ConditionTrue
			}
			return cs.Ready == want && cs.Started != nil && *cs.Started && hasCondition(st, corev1.PodReady, cond)
		}
	}
	st := e.waitStatus(p, "ready", ready(true))
	id := strings.TrimPrefix(st.ContainerStatuses[0].ContainerID, "containerd://")
	sh := func(cmd string) {
		_, _, err := e.h.Runtime.ExecSync(e.ctx, id, []string{"sh", "-c", cmd}, 10*time.Second)
		require.NoError(t, err)
	}
	sh("rm /tmp/ready")
	e.waitStatus(p, "not ready", ready(false))
	sh("touch /tmp/ready")
	e.waitStatus(p, "ready again", ready(true))

	sh("rm /tmp/alive")
	st = e.waitStatus(p, "restarted", func(st corev1.PodStatus) bool {
		return ready(true)(st) && st.ContainerStatuses[0].RestartCount == 1
	})
	require.NotEqual(t, "containerd://"+id, st.ContainerStatuses[0].ContainerID)
	require.NotNil(t, st.ContainerStatuses[0].LastTerminationState.Terminated)
}

// ConfigMap, Secret and emptyDir volumes: the files with their items and
// modes, the Secret on tmpfs, a ConfigMap change reaching the running
// container in place, and nothing left once the pod is deleted.
func TestVolumes(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{})
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cfg", Namespace: "default", UID: "uid-cfg"},
		Data: map[string]string{"greeting": "hello", "other": "x"}}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "sec", Namespace: "default", UID: "uid-sec"},
		Data: map[string][]byte{"password": []byte("pw")}}
	p := busyboxPod(e.h, "vols", corev1.RestartPolicyAlways, true, "sh", "-c", "echo data > /scratch/x; exec sleep 3600")
	fileMode, secretMode := int32(0o600), int32(0o400)
	p.Spec.Volumes = []corev1.Volume{
		{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"},
			Items:                []corev1.KeyToPath{{Key: "greeting", Path: "sub/hello.txt", Mode: &fileMode}},
		}}},
		{Name: "sec", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec", DefaultMode: &secretMode}}},
		{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
	}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{
		{Name: "cfg", MountPath: "/etc/cfg"}, {Name: "sec", MountPath: "/etc/sec"}, {Name: "scratch", MountPath: "/scratch"},
	}
	e.put(cm, secret, p)
	st := e.waitStatus(p, "running", running)
	id := strings.TrimPrefix(st.ContainerStatuses[0].ContainerID, "containerd://")
	sh := func(cmd string) (string, error) { return e.sh(id, cmd) }
	for cmd, want := range map[string]string{
		"cat /etc/cfg/sub/hello.txt":        "hello",
		"stat -c %a /etc/cfg/sub/hello.txt": "600",
		"ls /etc/cfg":                       "sub",
		"cat /etc/sec/password":             "pw",
		"stat -L -c %a /etc/sec/password":   "400", // a link into ..data, as with kubelet
		"cat /scratch/x":                    "data",
	} {
		got, err := sh(cmd)
		require.NoError(t, err, cmd)
		require.Equal(t, want, got, cmd)
	}
	_, err := sh("touch /etc/cfg/new")
	require.Error(t, err, "a ConfigMap volume is read-only")

	secretDir := filepath.Join(e.dir, "pods", string(p.UID), "volumes", "secret", "sec")
	var fs unix.Statfs_t
	require.NoError(t, unix.Statfs(secretDir, &fs))
	require.Equal(t, int64(unix.TMPFS_MAGIC), int64(fs.Type), "the Secret volume is not on tmpfs")

	cm.Data["greeting"] = "bye"
	e.put(cm)
	require.Eventually(t, func() bool {
		got, err := sh("cat /etc/cfg/sub/hello.txt")
		return err == nil && got == "bye"
	}, time.Minute, 50*time.Millisecond)
	st, _ = e.pub.status(t, string(p.UID))
	require.Equal(t, "containerd://"+id, st.ContainerStatuses[0].ContainerID, "updated in place, not restarted")

	e.deletePod(p)
	require.Eventually(t, func() bool { return len(e.containers(p.UID)) == 0 }, time.Minute, 50*time.Millisecond)
	require.Eventually(t, func() bool {
		_, err := os.Stat(filepath.Join(e.dir, "pods", string(p.UID)))
		return errors.Is(err, os.ErrNotExist)
	}, time.Minute, 50*time.Millisecond)
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	require.NotContains(t, string(mounts), e.dir, "a volume is still mounted")
}

// sh runs cmd with sh -c in container id and returns its trimmed stdout;
// output on stderr is an error.
func (e *env) sh(id, cmd string) (string, error) {
	out, errOut, err := e.h.Runtime.ExecSync(e.ctx, id, []string{"sh", "-c", cmd}, 10*time.Second)
	if err == nil && len(errOut) > 0 {
		err = errors.New(string(errOut))
	}
	return strings.TrimSpace(string(out)), err
}

// A running container whose image changes in the pod is replaced at once,
// whatever the restart policy.
func TestChangedSpecReplacesContainer(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{})
	p := busyboxPod(e.h, "upgrade", corev1.RestartPolicyNever, true, "sleep", "3600")
	e.put(p)
	before := e.waitStatus(p, "running", running).ContainerStatuses[0]
	p.Spec.Containers[0].Image, p.Spec.Containers[0].Command = e.h.PauseImage, nil
	e.put(p)
	after := e.waitStatus(p, "replaced", func(st corev1.PodStatus) bool {
		return running(st) && st.ContainerStatuses[0].Image == e.h.PauseImage && st.ContainerStatuses[0].RestartCount == 1
	}).ContainerStatuses[0]
	require.NotEqual(t, before.ContainerID, after.ContainerID)
	require.NotEqual(t, before.ImageID, after.ImageID)
}

// tether_pods_phase counts the pods by their latest status, each phase
// present from the start; a pod deleted leaves the count, and a manager
// started again on the same store and runtime counts the pods it adopts,
// whose status it does not publish again.
func TestPodsByPhase(t *testing.T) {
	e := newEnv(t)
	reg := promtest.NewRegistry()
	stop := e.run(pods.Config{Registerer: reg})
	phases := func(reg *promtest.Registry) map[string]float64 {
		out := map[string]float64{}
		for _, ph := range []string{"Pending", "Running", "Succeeded", "Failed", "Unknown"} {
			v, err := promtest.Value(reg, "tether_pods_phase", map[string]string{"phase": ph})
			if err != nil {
				return nil
			}
			out[ph] = v
		}
		return out
	}
	require.Equal(t, map[string]float64{"Pending": 0, "Running": 0, "Succeeded": 0, "Failed": 0, "Unknown": 0}, phases(reg))

	run := busyboxPod(e.h, "run", corev1.RestartPolicyAlways, true, "sleep", "3600")
	ok := busyboxPod(e.h, "ok", corev1.RestartPolicyNever, true, "true")
	bad := busyboxPod(e.h, "bad", corev1.RestartPolicyNever, true, "sh", "-c", "exit 3")
	e.put(run, ok, bad)
	want := map[string]float64{"Pending": 0, "Running": 1, "Succeeded": 1, "Failed": 1, "Unknown": 0}
	require.Eventually(t, func() bool { return maps.Equal(phases(reg), want) }, time.Minute, 50*time.Millisecond, "one pod in each of Running, Succeeded, Failed")

	stop()
	// The cloud sends each pod back with the status the edge published:
	// a new manager computes the same status and publishes none.
	for _, p := range []*corev1.Pod{run, ok, bad} {
		st, found := e.pub.status(t, string(p.UID))
		require.True(t, found)
		p.Status = st
	}
	e.put(run, ok, bad)
	reg = promtest.NewRegistry()
	stop = e.run(pods.Config{Registerer: reg})
	require.Eventually(t, func() bool { return maps.Equal(phases(reg), want) }, time.Minute, 50*time.Millisecond, "a restarted manager counts the pods it adopts")

	e.deletePod(run)
	want["Running"] = 0
	require.Eventually(t, func() bool { return maps.Equal(phases(reg), want) }, time.Minute, 50*time.Millisecond, "a deleted pod leaves the count")
	stop()
}
