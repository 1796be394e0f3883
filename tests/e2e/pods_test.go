package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tunnel"
)

// podRig is what the pod tests share: the package's control plane, one
// CloudCore, and one EdgeCore (edgecore/app) whose in-process CRI shim
// fronts a private containerd (tests/containerd). Pods are created in the
// API server bound to the edge's node, and everything the test checks is
// what the API server says, or what the containers wrote into hostPath
// directories under host.
type podRig struct {
	cs   kubernetes.Interface
	ns   string
	node string
	h    *containerd.Host
	c    *cloud
	e    *edge
	host string // hostPath volumes live below it
	logs string // the pod manager's LogDir
}

// podRigOptions configure startPodRig; the zero value is a host-network
// only containerd, the pod manager's defaults and production tunnel
// timings.
type podRigOptions struct {
	cni     bool                            // the CNI bridge for pods without hostNetwork
	pods    pods.Config                     // the pod manager's configuration (edgeOptions.pods)
	wrap    func(*store.Store) syncer.Store // wraps the edge syncer's store (edgeOptions.wrap)
	timings func(*tunnel.Options)           // testTimings, or nil for the defaults
}

// startPodRig starts containerd, CloudCore and EdgeCore, and returns once
// the edge's Node is registered Ready, which it is only once its runtime
// answers.
func startPodRig(tb testing.TB, o podRigOptions) *podRig {
	tb.Helper()
	var opts []containerd.Option
	if o.cni {
		opts = append(opts, containerd.WithCNI())
	}
	h := containerd.Start(tb, opts...)
	if o.pods.LogDir == "" {
		o.pods.LogDir = filepath.Join(tb.TempDir(), "logs")
	}
	env := cp.Env(tb)
	cs := adminClient(tb, env.Config)
	ns := env.Namespace(tb)
	c := startCloud(tb, env.Config, cloudOptions{timings: o.timings})
	id := c.admit(tb, uniqueNode("edge-pods"))
	e := startEdge(tb, id, dataDir(tb, id.node), c.addr, edgeOptions{timings: o.timings, runtime: h, pods: o.pods, wrap: o.wrap})
	waitRegistered(tb, cs, c, id.node)
	return &podRig{cs: cs, ns: ns, node: id.node, h: h, c: c, e: e, host: tb.TempDir(), logs: o.pods.LogDir}
}

// hostDir makes a fresh directory for a hostPath volume and returns it.
func (r *podRig) hostDir(tb testing.TB, name string) string {
	tb.Helper()
	dir := filepath.Join(r.host, name)
	require.NoError(tb, os.Mkdir(dir, 0o755))
	return dir
}

// pod is a busybox pod bound to the edge, its image present (the test
// host has no registry), running sh -c script, with a short grace period
// so that teardown is quick.
func (r *podRig) pod(name, script string) *corev1.Pod {
	grace := int64(2)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: r.ns, Name: name},
		Spec: corev1.PodSpec{
			NodeName: r.node, HostNetwork: true, TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name: "main", Image: r.h.BusyboxImage, ImagePullPolicy: corev1.PullNever,
				Command: []string{"sh", "-c", script},
			}},
		},
	}
}

// hostPath adds a hostPath volume of dir mounted at path in every
// container of p.
func hostPath(p *corev1.Pod, name, dir, path string) {
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{
		HostPath: &corev1.HostPathVolumeSource{Path: dir},
	}})
	for i := range p.Spec.Containers {
		p.Spec.Containers[i].VolumeMounts = append(p.Spec.Containers[i].VolumeMounts, corev1.VolumeMount{Name: name, MountPath: path})
	}
}

func (r *podRig) create(tb testing.TB, p *corev1.Pod) *corev1.Pod {
	tb.Helper()
	created, err := r.cs.CoreV1().Pods(r.ns).Create(context.Background(), p, metav1.CreateOptions{})
	require.NoError(tb, err)
	return created
}

// waitPod waits until the API server's copy of pod name satisfies ok and
// returns it; the failure message shows the last status seen.
func (r *podRig) waitPod(tb testing.TB, name string, timeout time.Duration, what string, ok func(*corev1.Pod) bool) *corev1.Pod {
	tb.Helper()
	var last *corev1.Pod
	var mu sync.Mutex
	cond := func() bool {
		p, err := r.cs.CoreV1().Pods(r.ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		mu.Lock()
		last = p
		mu.Unlock()
		return ok(p)
	}
	if !assert.Eventually(tb, cond, timeout, 100*time.Millisecond) {
		mu.Lock()
		defer mu.Unlock()
		status := "never read"
		if last != nil {
			status = fmt.Sprintf("%+v", last.Status)
		}
		tb.Fatalf("pod %s/%s: %s not seen within %s; last status: %s", r.ns, name, what, timeout, status)
	}
	mu.Lock()
	defer mu.Unlock()
	return last
}

// readFile waits until path has content and returns it, trimmed.
func readFile(tb testing.TB, path string) string {
	tb.Helper()
	var got string
	require.Eventually(tb, func() bool {
		b, err := os.ReadFile(path)
		got = strings.TrimSpace(string(b))
		return err == nil && got != ""
	}, 60*time.Second, 50*time.Millisecond, "nothing written to %s", path)
	return got
}

func podCondition(p *corev1.Pod, t corev1.PodConditionType) corev1.ConditionStatus {
	for _, c := range p.Status.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return ""
}

func mainStatus(p *corev1.Pod) *corev1.ContainerStatus {
	for i := range p.Status.ContainerStatuses {
		if p.Status.ContainerStatuses[i].Name == "main" {
			return &p.Status.ContainerStatuses[i]
		}
	}
	return nil
}

// runningReady: phase Running, Ready, and the container running.
func runningReady(p *corev1.Pod) bool {
	cs := mainStatus(p)
	return p.Status.Phase == corev1.PodRunning && podCondition(p, corev1.PodReady) == corev1.ConditionTrue &&
		cs != nil && cs.State.Running != nil && cs.Ready
}

// backoffBase is the pod manager's crash-loop back-off base in these
// tests: kubelet's 10 s would make restartCount 2 take 30 s; the doubling
// is the same.
const backoffBase = 2 * time.Second

// TestPods runs pods end to end: created in the API server, bound to the
// edge's node, synced by CloudCore to EdgeCore, run by its pod manager
// through the in-process CRI shim on a real containerd, their status
// written back through the outbox and CloudCore's upstream writer. One
// control plane, cloud, edge and containerd serve every subtest; the
// subtests run in parallel (most of their time is back-off and grace
// periods).
func TestPods(t *testing.T) {
	r := startPodRig(t, podRigOptions{
		cni: true, timings: testTimings, pods: pods.Config{BackoffBase: backoffBase, RelistPeriod: 5 * time.Second},
	})
	t.Run("ConfigMapSecretEnv", func(t *testing.T) { t.Parallel(); testConfigMapSecretEnv(t, r) })
	t.Run("CNI", func(t *testing.T) { t.Parallel(); testCNI(t, r) })
	t.Run("OnFailureBackoff", func(t *testing.T) { t.Parallel(); testOnFailureBackoff(t, r) })
	t.Run("NeverFailed", func(t *testing.T) { t.Parallel(); testNeverFailed(t, r) })
	t.Run("Probes", func(t *testing.T) { t.Parallel(); testProbes(t, r) })
	t.Run("GracefulDelete", func(t *testing.T) { t.Parallel(); testGracefulDelete(t, r) })
	t.Run("DoesNotFit", func(t *testing.T) { t.Parallel(); testDoesNotFit(t, r) })
}

// A container reads a file of its ConfigMap volume and an env var from a
// Secret and writes them into a hostPath; Running, Ready, the container's
// start time, hostIP and podIP reach the API server.
func testConfigMapSecretEnv(t *testing.T, r *podRig) {
	ctx := context.Background()
	_, err := r.cs.CoreV1().ConfigMaps(r.ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "app-config"}, Data: map[string]string{"greeting": "hello from a ConfigMap"},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = r.cs.CoreV1().Secrets(r.ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "app-secret"}, Data: map[string][]byte{"token": []byte("s3cr3t-t0ken")},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	out := r.hostDir(t, "config")
	p := r.pod("config", `cat /etc/app/greeting > /out/greeting && echo "$TOKEN" > /out/token && exec sleep 3600`)
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "cfg", VolumeSource: corev1.VolumeSource{
		ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-config"}},
	}})
	c := &p.Spec.Containers[0]
	c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "cfg", MountPath: "/etc/app"})
	c.Env = []corev1.EnvVar{{Name: "TOKEN", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
		LocalObjectReference: corev1.LocalObjectReference{Name: "app-secret"}, Key: "token",
	}}}}
	hostPath(p, "out", out, "/out")
	created := r.create(t, p)

	got := r.waitPod(t, p.Name, 90*time.Second, "Running and Ready", runningReady)
	require.Equal(t, "hello from a ConfigMap", readFile(t, filepath.Join(out, "greeting")))
	require.Equal(t, "s3cr3t-t0ken", readFile(t, filepath.Join(out, "token")))
	cs := mainStatus(got)
	require.False(t, cs.State.Running.StartedAt.IsZero(), "the container's start time is in the API server")
	require.False(t, cs.State.Running.StartedAt.Before(&created.CreationTimestamp),
		"the container started (%s) after the pod was created (%s)", cs.State.Running.StartedAt, created.CreationTimestamp)
	require.True(t, strings.HasPrefix(cs.ContainerID, "containerd://"), "container ID %q", cs.ContainerID)
	require.NotEmpty(t, cs.ImageID)
	require.Equal(t, int32(0), cs.RestartCount)
	require.NotNil(t, got.Status.StartTime)
	require.Equal(t, "127.0.0.1", got.Status.HostIP)
	require.Equal(t, "127.0.0.1", got.Status.PodIP, "a host-network pod has the node's address")
	for _, typ := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady, corev1.PodReadyToStartContainers} {
		require.Equal(t, corev1.ConditionTrue, podCondition(got, typ), "condition %s", typ)
	}
}

// A pod on the CNI bridge gets its address from the bridge's subnet.
func testCNI(t *testing.T, r *podRig) {
	p := r.pod("bridged", "exec sleep 3600")
	p.Spec.HostNetwork = false
	r.create(t, p)
	got := r.waitPod(t, p.Name, 90*time.Second, "Running with a pod IP", func(p *corev1.Pod) bool {
		return runningReady(p) && p.Status.PodIP != ""
	})
	ip, err := netip.ParseAddr(got.Status.PodIP)
	require.NoError(t, err)
	require.True(t, r.h.Network.Subnet.Contains(ip), "pod IP %s is in the bridge's subnet %s", ip, r.h.Network.Subnet)
	require.NotEqual(t, r.h.Network.Gateway, ip)
	require.Equal(t, []corev1.PodIP{{IP: got.Status.PodIP}}, got.Status.PodIPs)
	require.Equal(t, "127.0.0.1", got.Status.HostIP)
}

// instance is one run of a container, from its lastState in the API
// server.
type instance struct {
	id                string
	started, finished time.Time
	exitCode          int32
	reason            string
}

// A container that exits 1 with restartPolicy OnFailure is restarted with
// the crash-loop back-off: restartCount climbs to 2 and more, each
// instance's lastState keeps exit code 1, CrashLoopBackOff shows between
// restarts, and the time from an exit to the next start doubles
// (backoffBase, then twice that). Every status the API server holds is
// seen through a watch.
func testOnFailureBackoff(t *testing.T, r *podRig) {
	ctx := context.Background()
	p := r.pod("crashloop", "exit 1")
	p.Spec.RestartPolicy = corev1.RestartPolicyOnFailure
	w, err := r.cs.CoreV1().Pods(r.ns).Watch(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", p.Name).String()})
	require.NoError(t, err)
	defer w.Stop()
	r.create(t, p)

	seen := map[string]instance{}
	var counts []int32
	crashLoop := false
	timeout := time.After(2 * time.Minute)
	for len(seen) < 3 {
		select {
		case ev, ok := <-w.ResultChan():
			require.True(t, ok, "the watch ended")
			require.NotEqual(t, watch.Error, ev.Type, "watch error: %v", ev.Object)
			got, ok := ev.Object.(*corev1.Pod)
			require.True(t, ok)
			cs := mainStatus(got)
			if cs == nil {
				continue
			}
			if len(counts) == 0 || counts[len(counts)-1] != cs.RestartCount {
				counts = append(counts, cs.RestartCount)
			}
			if wt := cs.State.Waiting; wt != nil && wt.Reason == "CrashLoopBackOff" {
				crashLoop = true
			}
			if tm := cs.LastTerminationState.Terminated; tm != nil {
				seen[tm.ContainerID] = instance{id: tm.ContainerID, started: tm.StartedAt.Time, finished: tm.FinishedAt.Time,
					exitCode: tm.ExitCode, reason: tm.Reason}
			}
			require.NotEqual(t, corev1.PodFailed, got.Status.Phase, "OnFailure never fails the pod: %+v", got.Status)
		case <-timeout:
			t.Fatalf("after 2 minutes %d exited instances seen (restart counts %v)", len(seen), counts)
		}
	}
	require.True(t, slices.IsSorted(counts), "restartCount only climbs: %v", counts)
	require.GreaterOrEqual(t, counts[len(counts)-1], int32(2), "restart counts %v", counts)
	require.True(t, crashLoop, "CrashLoopBackOff showed between restarts")
	list := make([]instance, 0, len(seen))
	for _, in := range seen {
		require.Equal(t, int32(1), in.exitCode, "instance %s", in.id)
		require.Equal(t, "Error", in.reason, "instance %s", in.id)
		list = append(list, in)
	}
	slices.SortFunc(list, func(a, b instance) int { return a.started.Compare(b.started) })
	// The API server keeps whole seconds: with an integral back-off,
	// floor(exit+gap) - floor(exit) >= floor(gap) >= the back-off.
	for i := 1; i < len(list); i++ {
		gap := list[i].started.Sub(list[i-1].finished)
		want := backoffBase << (i - 1)
		require.GreaterOrEqual(t, gap, want, "restart %d came %s after the exit before it; the back-off is %s", i, gap, want)
		t.Logf("restart %d: %s after the exit (back-off %s)", i, gap, want)
	}
}

// restartPolicy Never: a container that exits 3 leaves the pod Failed,
// with the exit code and reason in the API server, and is not restarted.
func testNeverFailed(t *testing.T, r *podRig) {
	p := r.pod("never", "exit 3")
	p.Spec.RestartPolicy = corev1.RestartPolicyNever
	r.create(t, p)
	got := r.waitPod(t, p.Name, 90*time.Second, "Failed", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodFailed })
	cs := mainStatus(got)
	require.NotNil(t, cs)
	require.NotNil(t, cs.State.Terminated, "%+v", cs.State)
	require.Equal(t, int32(3), cs.State.Terminated.ExitCode)
	require.Equal(t, "Error", cs.State.Terminated.Reason)
	require.Equal(t, int32(0), cs.RestartCount)
	require.Equal(t, corev1.ConditionFalse, podCondition(got, corev1.PodReady))
}

// An exec readiness probe on a file the test creates and removes through a
// hostPath flips Ready both ways; a liveness probe that starts failing
// restarts the container.
func testProbes(t *testing.T, r *podRig) {
	dir := r.hostDir(t, "probes")
	alive := filepath.Join(dir, "alive")
	require.NoError(t, os.WriteFile(alive, []byte("ok"), 0o644))
	p := r.pod("probed", "exec sleep 3600")
	hostPath(p, "probe", dir, "/probe")
	c := &p.Spec.Containers[0]
	c.ReadinessProbe = &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"cat", "/probe/ready"}}},
		PeriodSeconds: 1, FailureThreshold: 1, SuccessThreshold: 1, TimeoutSeconds: 5,
	}
	c.LivenessProbe = &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"cat", "/probe/alive"}}},
		PeriodSeconds: 1, FailureThreshold: 2, SuccessThreshold: 1, TimeoutSeconds: 5,
	}
	r.create(t, p)

	first := r.waitPod(t, p.Name, 90*time.Second, "running, not Ready", func(p *corev1.Pod) bool {
		cs := mainStatus(p)
		return p.Status.Phase == corev1.PodRunning && cs != nil && cs.State.Running != nil &&
			podCondition(p, corev1.PodReady) == corev1.ConditionFalse
	})
	require.False(t, mainStatus(first).Ready)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ready"), []byte("ok"), 0o644))
	r.waitPod(t, p.Name, 60*time.Second, "Ready once the readiness file exists", runningReady)
	require.NoError(t, os.Remove(filepath.Join(dir, "ready")))
	r.waitPod(t, p.Name, 60*time.Second, "not Ready once the readiness file is gone", func(p *corev1.Pod) bool {
		cs := mainStatus(p)
		return podCondition(p, corev1.PodReady) == corev1.ConditionFalse && cs != nil && cs.State.Running != nil && !cs.Ready
	})
	unready, err := r.cs.CoreV1().Pods(r.ns).Get(context.Background(), p.Name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, mainStatus(first).ContainerID, mainStatus(unready).ContainerID, "readiness alone restarts nothing")

	require.NoError(t, os.Remove(alive))
	restarted := r.waitPod(t, p.Name, 90*time.Second, "restarted by the liveness probe", func(p *corev1.Pod) bool {
		cs := mainStatus(p)
		return cs != nil && cs.RestartCount >= 1 && cs.LastTerminationState.Terminated != nil
	})
	cs := mainStatus(restarted)
	require.Equal(t, mainStatus(first).ContainerID, cs.LastTerminationState.Terminated.ContainerID, "the killed instance is the first one")
	require.NotEqual(t, corev1.PodFailed, restarted.Status.Phase)
}

// Deleting a pod with a grace period: the container, which traps SIGTERM,
// writes a marker before it exits, and the pod object is gone from the API
// server afterwards. Nothing but the edge finishes a graceful deletion
// here (no kubelet, no controller manager): the final delete is the
// edge's, through CloudCore's upstream writer, with the pod's UID as the
// precondition.
func testGracefulDelete(t *testing.T, r *podRig) {
	ctx := context.Background()
	out := r.hostDir(t, "graceful")
	p := r.pod("graceful", `trap 'echo got SIGTERM > /out/marker; exit 0' TERM; echo started > /out/started; sleep 3600 & wait`)
	grace := int64(30)
	p.Spec.TerminationGracePeriodSeconds = &grace
	hostPath(p, "out", out, "/out")
	created := r.create(t, p)
	r.waitPod(t, p.Name, 90*time.Second, "Running and Ready", runningReady)
	// The trap is set before the marker of the start is written.
	require.Equal(t, "started", readFile(t, filepath.Join(out, "started")))
	logDir := filepath.Join(r.logs, r.ns+"_"+p.Name+"_"+string(created.UID))
	require.FileExists(t, filepath.Join(logDir, "main_0.log"), "the container logs where kubelet would")

	// The delete's grace period (shorter than the pod's 30 s) is the bound:
	// a container that ignored SIGTERM would be killed only once it ends.
	deleteGrace := int64(20)
	begin := time.Now()
	require.NoError(t, r.cs.CoreV1().Pods(r.ns).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &deleteGrace}))
	pending, err := r.cs.CoreV1().Pods(r.ns).Get(ctx, p.Name, metav1.GetOptions{})
	require.NoError(t, err, "a graceful delete leaves the object until the node finishes it")
	require.NotNil(t, pending.DeletionTimestamp)
	require.Equal(t, "got SIGTERM", readFile(t, filepath.Join(out, "marker")))
	require.Eventually(t, func() bool {
		_, err := r.cs.CoreV1().Pods(r.ns).Get(ctx, p.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}, 60*time.Second, 50*time.Millisecond, "the pod is gone from the API server once the edge stopped it")
	took := time.Since(begin)
	t.Logf("graceful delete: the pod was gone %s after the delete call", took.Round(10*time.Millisecond))
	require.Less(t, took, time.Duration(deleteGrace)*time.Second, "the container exited on SIGTERM, long before the grace period ended")
	ctrs, err := r.h.Runtime.ListContainers(ctx, &runtimeapi.ContainerFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(created.UID)},
	})
	require.NoError(t, err)
	require.Empty(t, ctrs, "the pod's containers are removed")
	sbs, err := r.h.Runtime.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(created.UID)},
	})
	require.NoError(t, err)
	require.Empty(t, sbs, "the pod's sandbox is removed")
	require.NoDirExists(t, logDir, "the pod's logs go with it")
}

// A pod whose request does not fit the node's allocatable is not started
// and is Failed with kubelet's reason.
func testDoesNotFit(t *testing.T, r *podRig) {
	for _, tc := range []struct {
		name     string
		resource corev1.ResourceName
		request  string
		reason   string
	}{
		{"too-much-cpu", corev1.ResourceCPU, "1000", "OutOfcpu"},
		{"too-much-memory", corev1.ResourceMemory, "1Ti", "OutOfmemory"},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			p := r.pod(tc.name, "exec sleep 3600")
			p.Spec.Containers[0].Resources.Requests = corev1.ResourceList{tc.resource: resource.MustParse(tc.request)}
			created := r.create(t, p)
			got := r.waitPod(t, p.Name, 60*time.Second, "Failed", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodFailed })
			require.Equal(t, tc.reason, got.Status.Reason)
			require.Contains(t, got.Status.Message, string(tc.resource))
			sbs, err := r.h.Runtime.ListPodSandbox(context.Background(), &runtimeapi.PodSandboxFilter{
				LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(created.UID)},
			})
			require.NoError(t, err)
			require.Empty(t, sbs, "a pod that does not fit gets no sandbox")
		})
	}
}
