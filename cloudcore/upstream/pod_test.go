package upstream

import (
	"context"
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
)

// startCatalog runs the real catalog until the test ends.
func startCatalog(t *testing.T, cs kubernetes.Interface) *catalog.Catalog {
	t.Helper()
	c, err := catalog.New(cs, catalog.Config{Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	sctx, scancel := context.WithTimeout(ctx, waitFor)
	defer scancel()
	require.NoError(t, c.WaitForSync(sctx))
	return c
}

// staleBinding is a catalog whose cache lags the API server: it still
// holds a pod that was deleted or replaced. A real informer cannot be
// held in that state on demand, so the tests that need it use this.
type staleBinding struct{ node, uid string }

func (b staleBinding) Version(node string, _ objsync.Key) (string, string, bool) {
	return b.uid, "1", node == b.node
}

func createPod(t *testing.T, cs kubernetes.Interface, ns, name, node string) *corev1.Pod {
	t.Helper()
	p, err := cs.CoreV1().Pods(ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app"}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	return p
}

func deletePod(t *testing.T, cs kubernetes.Interface, ns, name string) {
	t.Helper()
	require.NoError(t, cs.CoreV1().Pods(ns).Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}))
}

// waitCached waits until the catalog holds pod p for node, with p's uid.
func waitCached(t *testing.T, c *catalog.Catalog, node string, p *corev1.Pod) {
	t.Helper()
	key := objsync.Key{Kind: "Pod", Namespace: p.Namespace, Name: p.Name}
	require.Eventually(t, func() bool {
		uid, _, ok := c.Version(node, key)
		return ok && uid == string(p.UID)
	}, waitFor, tick, "catalog never cached pod %s/%s uid %s for %s", p.Namespace, p.Name, p.UID, node)
}

func podMessage(t *testing.T, ns, name, uid string, st corev1.PodStatus) *message.Message {
	t.Helper()
	data, err := json.Marshal(st)
	require.NoError(t, err)
	return &message.Message{Kind: message.KindUpstream, Op: message.OpStatus,
		Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: ns, Name: name, UID: uid}, Payload: data}
}

func podPhase(t *testing.T, cs kubernetes.Interface, ns, name string) corev1.PodPhase {
	t.Helper()
	p, err := cs.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	require.NoError(t, err)
	return p.Status.Phase
}

// TestPodStatus: a node writes the status of its own pods, of the pod it
// ran only (the uid is a precondition, so a status queued for a pod since
// replaced by one of the same name is rejected, never written), and never
// fields NodeRestriction keeps from kubelets; API refusals are final.
func TestPodStatus(t *testing.T) {
	env := cp.Env(t)
	admin := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	node := nodeName(t, admin)
	other := nodeName(t, admin)
	for _, n := range []string{node, other} {
		_, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name: n, Labels: map[string]string{catalog.DefaultEdgeLabel: ""},
		}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	cat := startCatalog(t, admin)
	running := corev1.PodStatus{Phase: corev1.PodRunning, Message: "from the edge"}

	t.Run("own pod, its uid", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "own", node)
		waitCached(t, cat, node, p)
		require.NoError(t, f.w.Apply(ctx, node, podMessage(t, ns, p.Name, string(p.UID), running)))
		require.Equal(t, corev1.PodRunning, podPhase(t, admin, ns, p.Name))
	})
	t.Run("own pod, no uid", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "nouid", node)
		waitCached(t, cat, node, p)
		require.NoError(t, f.w.Apply(ctx, node, podMessage(t, ns, p.Name, "", running)))
		require.Equal(t, corev1.PodRunning, podPhase(t, admin, ns, p.Name))
	})
	t.Run("status of a replaced pod", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		old := createPod(t, admin, ns, "replaced", node)
		waitCached(t, cat, node, old)
		deletePod(t, admin, ns, old.Name)
		p := createPod(t, admin, ns, old.Name, node)
		waitCached(t, cat, node, p)
		// Queued offline while the old pod ran; sent after the new one exists.
		err := f.w.Apply(ctx, node, podMessage(t, ns, p.Name, string(old.UID), corev1.PodStatus{Phase: corev1.PodFailed}))
		requireRefused(t, f, err, dispatch.ErrRejected, reasonPodReplaced, 0)
		require.Equal(t, corev1.PodPending, podPhase(t, admin, ns, p.Name), "the new pod's status is untouched")
	})
	t.Run("stale cache, no uid", func(t *testing.T) {
		old := createPod(t, admin, ns, "stale", node)
		deletePod(t, admin, ns, old.Name)
		p := createPod(t, admin, ns, old.Name, node)
		f := newFixture(t, staleBinding{node: node, uid: string(old.UID)}, Config{})
		err := f.w.Apply(ctx, node, podMessage(t, ns, p.Name, "", corev1.PodStatus{Phase: corev1.PodFailed}))
		requireRefused(t, f, err, dispatch.ErrRejected, reasonPodReplaced, 0)
		require.Equal(t, corev1.PodPending, podPhase(t, admin, ns, p.Name))
	})
	t.Run("pod gone", func(t *testing.T) {
		old := createPod(t, admin, ns, "gone", node)
		deletePod(t, admin, ns, old.Name)
		f := newFixture(t, staleBinding{node: node, uid: string(old.UID)}, Config{})
		err := f.w.Apply(ctx, node, podMessage(t, ns, old.Name, string(old.UID), running))
		requireRefused(t, f, err, dispatch.ErrRejected, reasonPodGone, 0)
	})
	t.Run("resourceClaimStatuses", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "claims", node)
		waitCached(t, cat, node, p)
		st := running
		claim := "stolen-gpu"
		st.ResourceClaimStatuses = []corev1.PodResourceClaimStatus{{Name: "gpu", ResourceClaimName: &claim}}
		err := f.w.Apply(ctx, node, podMessage(t, ns, p.Name, string(p.UID), st))
		requireRefused(t, f, err, dispatch.ErrForbidden, reasonField, 0)
		require.Equal(t, corev1.PodPending, podPhase(t, admin, ns, p.Name))
	})
	t.Run("invalid status", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "invalid", node)
		waitCached(t, cat, node, p)
		st := running
		st.PodIP = "not-an-ip"
		err := f.w.Apply(ctx, node, podMessage(t, ns, p.Name, string(p.UID), st))
		requireRefused(t, f, err, dispatch.ErrRejected, reasonInvalid, 0)
	})
	t.Run("another node's pod", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "theirs", other)
		waitCached(t, cat, other, p)
		err := f.w.Apply(ctx, node, podMessage(t, ns, p.Name, string(p.UID), running))
		requireRefused(t, f, err, dispatch.ErrForbidden, reasonNotOwn, 0)
		require.Equal(t, corev1.PodPending, podPhase(t, admin, ns, p.Name))
	})
	t.Run("transient errors are not final", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "transient", node)
		waitCached(t, cat, node, p)
		cctx, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
		defer cancel()
		err := f.w.Apply(cctx, node, podMessage(t, ns, p.Name, string(p.UID), running))
		require.Error(t, err)
		require.NotErrorIs(t, err, dispatch.ErrRejected)
		require.NotErrorIs(t, err, dispatch.ErrForbidden)
	})
}

// TestPodStatusPatchIsAPrecondition shows the mechanism the writer relies
// on: the API server refuses a status patch naming another uid.
func TestPodStatusPatchIsAPrecondition(t *testing.T) {
	env := cp.Env(t)
	admin := adminClient(t, env.Config)
	ns := env.Namespace(t)
	p := createPod(t, admin, ns, "p", "some-node")
	_, err := admin.CoreV1().Pods(ns).Patch(context.Background(), p.Name, types.MergePatchType,
		[]byte(`{"metadata":{"uid":"00000000-0000-0000-0000-000000000000"},"status":{"phase":"Failed"}}`), metav1.PatchOptions{}, "status")
	require.True(t, invalidField(err, "metadata.uid"), "got %v", err)
}

// TestPodDelete: an edge finishes the deletion of a pod bound to it, for
// that pod only (its uid is a precondition); never another node's pod, a
// recreated pod of the same name, or a pod without naming its uid.
func TestPodDelete(t *testing.T) {
	env := cp.Env(t)
	admin := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	node, other := nodeName(t, admin), nodeName(t, admin)
	for _, n := range []string{node, other} {
		_, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name: n, Labels: map[string]string{catalog.DefaultEdgeLabel: ""},
		}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	cat := startCatalog(t, admin)
	del := func(ns, name, uid string) *message.Message {
		return &message.Message{Kind: message.KindUpstream, Op: message.OpDelete,
			Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: ns, Name: name, UID: uid}}
	}
	gone := func(name string) bool {
		_, err := admin.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}

	t.Run("own pod", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "own-del", node)
		waitCached(t, cat, node, p)
		require.NoError(t, f.w.Apply(ctx, node, del(ns, p.Name, string(p.UID))))
		require.True(t, gone(p.Name))
	})
	t.Run("without uid", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "nouid-del", node)
		waitCached(t, cat, node, p)
		requireRefused(t, f, f.w.Apply(ctx, node, del(ns, p.Name, "")), dispatch.ErrForbidden, reasonNotOwn, 0)
		require.False(t, gone(p.Name))
	})
	t.Run("recreated pod", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		old := createPod(t, admin, ns, "recreated-del", node)
		waitCached(t, cat, node, old)
		deletePod(t, admin, ns, old.Name)
		p := createPod(t, admin, ns, old.Name, node)
		waitCached(t, cat, node, p)
		requireRefused(t, f, f.w.Apply(ctx, node, del(ns, p.Name, string(old.UID))), dispatch.ErrRejected, reasonPodReplaced, 0)
		require.False(t, gone(p.Name), "the new pod is untouched")
	})
	t.Run("another node's pod", func(t *testing.T) {
		f := newFixture(t, cat, Config{})
		p := createPod(t, admin, ns, "theirs-del", other)
		waitCached(t, cat, other, p)
		requireRefused(t, f, f.w.Apply(ctx, node, del(ns, p.Name, string(p.UID))), dispatch.ErrForbidden, reasonNotOwn, 0)
		require.False(t, gone(p.Name))
	})
}

// TestPodStatusBeforeRegistration: a pod status from a node the cloud does
// not know as an edge node yet (its registration still queued behind it)
// is a transient refusal, not a final one: the edge keeps it and sends it
// again once the Node is registered.
func TestPodStatusBeforeRegistration(t *testing.T) {
	env := cp.Env(t)
	admin := adminClient(t, env.Config)
	ns := env.Namespace(t)
	cat := startCatalog(t, admin)
	f := newFixture(t, cat, Config{})
	node := nodeName(t, admin)
	p := createPod(t, admin, ns, "early", node)
	err := f.w.Apply(context.Background(), node, podMessage(t, ns, p.Name, string(p.UID), corev1.PodStatus{Phase: corev1.PodRunning}))
	require.Error(t, err)
	require.NotErrorIs(t, err, dispatch.ErrForbidden)
	require.NotErrorIs(t, err, dispatch.ErrRejected)
}
