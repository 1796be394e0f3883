package app_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// config is an EdgeCore whose cloud is unreachable.
func config(t *testing.T) app.Config {
	ca, err := pki.NewCA("test-ca", time.Hour)
	require.NoError(t, err)
	leaf, key, err := ca.Issue(pki.LeafRequest{CommonName: "edge-1", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)
	dir := t.TempDir()
	return app.Config{
		Cloud:       []string{"127.0.0.1:1"},
		Node:        "edge-1",
		Certificate: tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf},
		CA:          ca.Cert,
		IdentityDir: filepath.Join(dir, "identity"),
		DataDir:     filepath.Join(dir, "data"),
	}
}

// With a CRI endpoint, EdgeCore runs the pods of its store, with the cloud
// unreachable, and queues their status in the outbox.
func TestRunsPodsFromStore(t *testing.T) {
	h := containerd.Start(t)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 2*time.Minute)
	defer cancel()
	cfg := config(t)
	cfg.CRIEndpoint = h.Endpoint()
	cfg.Pods = pods.Config{HostIPs: []string{"192.0.2.10"}, LogDir: filepath.Join(t.TempDir(), "logs"), RelistPeriod: time.Second}
	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close()) }()

	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default", UID: "uid-web"},
		Spec: corev1.PodSpec{NodeName: "edge-1", HostNetwork: true, Containers: []corev1.Container{{
			Name: "main", Image: h.BusyboxImage, ImagePullPolicy: corev1.PullNever, Command: []string{"sleep", "3600"},
		}}},
	}
	putPod(ctx, t, a, pod)
	defer run(ctx, t, a)()

	require.Eventually(t, func() bool {
		items, err := a.Store().Pending(ctx, 100)
		if err != nil {
			return false
		}
		for _, it := range items {
			if it.Op != message.OpStatus || it.Resource.Kind != "Pod" || it.Resource.UID != "uid-web" {
				continue
			}
			var st corev1.PodStatus
			if json.Unmarshal(it.Data, &st) == nil && st.Phase == corev1.PodRunning {
				return true
			}
		}
		return false
	}, time.Minute, 50*time.Millisecond)
	cs, err := h.Runtime.ListContainers(ctx, &runtimeapi.ContainerFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": "uid-web"},
	})
	require.NoError(t, err)
	require.Len(t, cs, 1)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, cs[0].State)
}

// With the shim in EdgeCore and no other endpoint, the pod manager drives
// the shim (store -> pods -> CRI -> shim -> containerd): the sandbox and
// container are in the shim's id map, containerd's exit event reaches the
// pod manager at once (the relist is an hour away), and the Node is Ready
// once the shim answers.
func TestPodsThroughInProcessShim(t *testing.T) {
	h := containerd.Start(t)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 2*time.Minute)
	defer cancel()
	cfg := config(t)
	cfg.CRI = app.CRIConfig{Listen: filepath.Join(t.TempDir(), "cri.sock"), Containerd: h.Endpoint()}
	cfg.Pods = pods.Config{HostIPs: []string{"192.0.2.10"}, LogDir: filepath.Join(t.TempDir(), "logs"), RelistPeriod: time.Hour}
	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close()) }()

	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "once", Namespace: "default", UID: "uid-once"},
		Spec: corev1.PodSpec{NodeName: "edge-1", HostNetwork: true, RestartPolicy: corev1.RestartPolicyNever, Containers: []corev1.Container{{
			Name: "main", Image: h.BusyboxImage, ImagePullPolicy: corev1.PullNever, Command: []string{"sh", "-c", "sleep 2; exit 7"},
		}}},
	}
	putPod(ctx, t, a, pod)
	defer run(ctx, t, a)()

	phase := func() (corev1.PodPhase, int32) {
		items, err := a.Store().Pending(ctx, 100)
		if err != nil {
			return "", 0
		}
		for _, it := range items {
			if it.Op != message.OpStatus || it.Resource.Kind != "Pod" || it.Resource.UID != "uid-once" {
				continue
			}
			var st corev1.PodStatus
			if json.Unmarshal(it.Data, &st) == nil {
				var code int32
				if len(st.ContainerStatuses) == 1 && st.ContainerStatuses[0].State.Terminated != nil {
					code = st.ContainerStatuses[0].State.Terminated.ExitCode
				}
				return st.Phase, code
			}
		}
		return "", 0
	}
	require.Eventually(t, func() bool { p, _ := phase(); return p == corev1.PodRunning }, time.Minute, 50*time.Millisecond)
	ids, err := a.Store().RuntimeIDs().List(ctx)
	require.NoError(t, err)
	require.Len(t, ids, 2, "the sandbox and the container went through the shim: %+v", ids)
	// The exit comes from containerd's events through the shim's backend:
	// without them the pod would stay Running until the hourly relist.
	require.Eventually(t, func() bool { p, code := phase(); return p == corev1.PodFailed && code == 7 }, 30*time.Second, 50*time.Millisecond)
	require.Eventually(t, func() bool {
		items, err := a.Store().Pending(ctx, 100)
		if err != nil {
			return false
		}
		for _, it := range items {
			if it.Resource.Kind != "Node" {
				continue
			}
			var n corev1.Node
			if json.Unmarshal(it.Data, &n) != nil {
				return false
			}
			for _, c := range n.Status.Conditions {
				if c.Type == corev1.NodeReady {
					return c.Status == corev1.ConditionTrue
				}
			}
		}
		return false
	}, time.Minute, 100*time.Millisecond, "the Node turns Ready once the shim answers")
}

// putPod writes pod into a's store as the cloud's sync would.
func putPod(ctx context.Context, t *testing.T, a *app.App, pod *corev1.Pod) {
	t.Helper()
	data, err := json.Marshal(pod)
	require.NoError(t, err)
	require.NoError(t, a.Store().Apply(ctx, []store.Change{{Op: message.OpUpsert, Object: store.Object{
		Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)},
		Version:  "1", Data: data,
	}}}))
}

// run runs a until the returned stop is called, which waits for Run.
func run(ctx context.Context, t *testing.T, a *app.App) (stop func()) {
	t.Helper()
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(runCtx) }()
	return func() {
		cancel()
		require.NoError(t, <-done)
	}
}
