package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/containerd"
)

// serviceAccountMount is where the ServiceAccount admission plugin mounts
// the kube-api-access volume.
const serviceAccountMount = "/var/run/secrets/kubernetes.io/serviceaccount"

// apiAccessVolume is the volume the ServiceAccount admission plugin
// injects into every pod (plugin/pkg/admission/serviceaccount): a token
// of the pod's service account for the API server's audience, the
// cluster's root CA from the kube-root-ca.crt ConfigMap, the namespace
// from the downward API, all 0644.
func apiAccessVolume(name string) corev1.Volume {
	exp, mode := int64(3607), int32(0o644)
	return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		DefaultMode: &mode,
		Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: &exp}},
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "kube-root-ca.crt"},
				Items: []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}}}},
			{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{
				{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: "metadata.namespace"}}}}},
		},
	}}}
}

// tokenReview asks the API server who token is.
func tokenReview(t *testing.T, cs kubernetes.Interface, token string) authenticationv1.TokenReviewStatus {
	t.Helper()
	r, err := cs.AuthenticationV1().TokenReviews().Create(context.Background(), &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	return r.Status
}

// unmountBelow unmounts every mount below dir (the pods' tmpfs volumes),
// deepest first.
func unmountBelow(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Open("/proc/self/mounts")
	require.NoError(t, err)
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 1 && strings.HasPrefix(fields[1], dir+"/") {
			mounts = append(mounts, fields[1])
		}
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		require.NoError(t, unix.Unmount(mounts[i], 0), "unmount %s", mounts[i])
	}
}

// removeSandboxes removes the pod's sandboxes straight in containerd, as a
// reboot loses them.
func removeSandboxes(ctx context.Context, t *testing.T, h *containerd.Host, uid string) {
	t.Helper()
	sbs, err := h.Runtime.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{LabelSelector: map[string]string{"io.kubernetes.pod.uid": uid}})
	require.NoError(t, err)
	require.NotEmpty(t, sbs)
	for _, sb := range sbs {
		require.NoError(t, h.Runtime.StopPodSandbox(ctx, sb.Id))
		require.NoError(t, h.Runtime.RemovePodSandbox(ctx, sb.Id))
	}
}

// TestServiceAccountTokens: a pod with the kube-api-access volume the
// ServiceAccount admission plugin injects runs at the edge, and its token
// file is a token the API server accepts as the pod's service account,
// bound to the pod; at 80 % of its lifetime (the edge's token clock moved
// on) the file is rewritten with a new one. Requests for a pod of another
// node, as another service account or for another uid are refused over
// the tunnel and counted. With the cloud down, an EdgeCore started again
// on a node that lost its containers and tmpfs (a reboot) brings the pod
// back with the stored token, asking the cloud nothing; with no token
// stored it leaves the pod waiting (TokenUnavailable) until the cloud is
// back. A deleted pod's tokens leave the store.
func TestServiceAccountTokens(t *testing.T) {
	outer := t // what outlives a subtest (restarted daemons) is the test's
	h := containerd.Start(t)
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := klog.NewContext(t.Context(), logr.Discard())
	c := startCloud(t, env.Config, cloudOptions{timings: testTimings})
	node := uniqueNode("edge-tok")
	id := c.admit(t, node)
	dir := dataDir(t, node)
	root := filepath.Join(t.TempDir(), "pods")
	t.Cleanup(func() { unmountBelow(t, root) })
	tokenClock := clocktesting.NewFakePassiveClock(time.Now())
	podsCfg := pods.Config{RootDir: root, RelistPeriod: time.Second, TokenClock: tokenClock}
	opts := edgeOptions{timings: testTimings, runtime: h, pods: podsCfg}
	e := startEdge(t, id, dir, c.addr, opts)
	waitRegistered(t, cs, c, node)

	// What a cluster has and this one lacks (no controller manager): the
	// service account and the root CA ConfigMap.
	for _, sa := range []string{"app", "other"} {
		_, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	_, err := cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kube-root-ca.crt"},
		Data: map[string]string{"ca.crt": string(env.Config.CAData)}}, metav1.CreateOptions{})
	require.NoError(t, err)

	out := filepath.Join(t.TempDir(), "out")
	require.NoError(t, os.Mkdir(out, 0o755))
	grace := int64(1)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "api-client"},
		Spec: corev1.PodSpec{
			NodeName: node, HostNetwork: true, ServiceAccountName: "app", TerminationGracePeriodSeconds: &grace,
			Volumes: []corev1.Volume{apiAccessVolume("kube-api-access-7xk2p"),
				{Name: "out", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: out}}}},
			Containers: []corev1.Container{{
				Name: "main", Image: h.BusyboxImage, ImagePullPolicy: corev1.PullNever,
				// What a client in the pod reads, copied out as it changes.
				Command: []string{"sh", "-c", `cd ` + serviceAccountMount + ` && stat -L -c %a token > /out/mode && cp namespace ca.crt /out/ &&
while true; do cat token > /out/token.tmp && mv /out/token.tmp /out/token; sleep 0.2; done`},
				VolumeMounts: []corev1.VolumeMount{
					{Name: "kube-api-access-7xk2p", MountPath: serviceAccountMount, ReadOnly: true},
					{Name: "out", MountPath: "/out"},
				},
			}},
		},
	}
	created, err := cs.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	require.NoError(t, err)
	uid := string(created.UID)
	require.Eventually(t, func() bool {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		return err == nil && runningReady(p)
	}, 90*time.Second, 100*time.Millisecond, "the pod with the kube-api-access volume runs at the edge")

	first := readFile(t, filepath.Join(out, "token"))
	require.Equal(t, ns, readFile(t, filepath.Join(out, "namespace")))
	require.Equal(t, strings.TrimSpace(string(env.Config.CAData)), readFile(t, filepath.Join(out, "ca.crt")))
	require.Equal(t, "644", readFile(t, filepath.Join(out, "mode")), "the token file has the volume's defaultMode")
	require.Equal(t, 2, strings.Count(first, "."), "the token file is a JWT")
	st := tokenReview(t, cs, first)
	require.True(t, st.Authenticated, "the API server does not accept the pod's token: %s", st.Error)
	require.Equal(t, "system:serviceaccount:"+ns+":app", st.User.Username)
	require.Equal(t, authenticationv1.ExtraValue{pod.Name}, st.User.Extra["authentication.kubernetes.io/pod-name"])
	require.Equal(t, authenticationv1.ExtraValue{uid}, st.User.Extra["authentication.kubernetes.io/pod-uid"])
	stored, ok, err := e.st.PodToken(ctx, uid, "kube-api-access-7xk2p/token")
	require.NoError(t, err)
	require.True(t, ok, "the token is kept in the edge store")
	require.Equal(t, first, stored.Token)

	t.Run("refused", func(t *testing.T) {
		other := uniqueNode("edge-tok-other")
		createEdgeNode(t, cs, other)
		t.Cleanup(func() { _ = cs.CoreV1().Nodes().Delete(context.Background(), other, metav1.DeleteOptions{}) })
		theirs := pod.DeepCopy()
		theirs.Name, theirs.Spec.NodeName = "theirs", other
		theirs.Spec.Containers[0].Command = []string{"sleep", "3600"}
		theirs, err := cs.CoreV1().Pods(ns).Create(ctx, theirs, metav1.CreateOptions{})
		require.NoError(t, err)
		require.Eventually(t, func() bool {
			got, _, ok := c.cat.Version(other, objsync.Key{Kind: "Pod", Namespace: ns, Name: theirs.Name})
			return ok && got == string(theirs.UID)
		}, 30*time.Second, 10*time.Millisecond)
		for _, tc := range []struct {
			name, sa, reason string
			req              message.TokenRequest
		}{
			{"pod of another node", "app", "not_bound", message.TokenRequest{Pod: theirs.Name, PodUID: string(theirs.UID), ExpirationSeconds: 3607}},
			{"another service account", "other", "service_account_mismatch", message.TokenRequest{Pod: pod.Name, PodUID: uid, ExpirationSeconds: 3607}},
			{"another uid", "app", "uid_mismatch", message.TokenRequest{Pod: pod.Name, PodUID: string(theirs.UID), ExpirationSeconds: 3607}},
		} {
			before := c.counter(t, "tether_token_refused_total", map[string]string{"reason": tc.reason})
			_, err := e.app.Syncer().RequestToken(ctx, ns, tc.sa, tc.req)
			require.ErrorIs(t, err, syncer.ErrRefused, tc.name)
			require.Equal(t, before+1, c.counter(t, "tether_token_refused_total", map[string]string{"reason": tc.reason}), tc.name)
		}
	})

	t.Run("refreshed at 80 percent", func(t *testing.T) {
		issued := c.counter(t, "tether_token_requests_total", map[string]string{"result": "issued"})
		// The next token's expiry (whole seconds) must fall after the
		// first's by more than the step below, or it would be due at once.
		require.Eventually(t, func() bool { return time.Now().After(stored.IssuedAt.Add(3 * time.Second)) }, 10*time.Second, 50*time.Millisecond)
		tokenClock.SetTime(stored.IssuedAt.Add(stored.ExpiresAt.Sub(stored.IssuedAt) * 4 / 5).Add(500 * time.Millisecond))
		require.Eventually(t, func() bool {
			b, err := os.ReadFile(filepath.Join(out, "token"))
			return err == nil && len(b) > 0 && strings.TrimSpace(string(b)) != first
		}, 60*time.Second, 100*time.Millisecond, "the running container sees a new token")
		second := readFile(t, filepath.Join(out, "token"))
		st := tokenReview(t, cs, second)
		require.True(t, st.Authenticated, "the refreshed token is not accepted: %s", st.Error)
		require.Equal(t, "system:serviceaccount:"+ns+":app", st.User.Username)
		require.Equal(t, issued+1, c.counter(t, "tether_token_requests_total", map[string]string{"result": "issued"}), "one refresh, not one per sync")
		stored, _, err = e.st.PodToken(ctx, uid, "kube-api-access-7xk2p/token")
		require.NoError(t, err)
		require.Equal(t, second, stored.Token)
	})

	// A reboot with the cloud down: EdgeCore stops, the node loses its
	// containers and its tmpfs volumes.
	reboot := func() {
		c.stop()
		e.stop()
		removeSandboxes(ctx, t, h, uid)
		unmountBelow(t, root)
		require.NoError(t, os.RemoveAll(filepath.Join(root, uid)))
		require.NoError(t, os.Remove(filepath.Join(out, "token")))
	}
	t.Run("offline restart with the stored token", func(t *testing.T) {
		reboot()
		e = startEdge(outer, id, dir, c.addr, opts)
		require.Eventually(t, func() bool {
			_, ok := runningContainer(ctx, h, uid)
			return ok
		}, 60*time.Second, 100*time.Millisecond, "EdgeCore brings the pod back with the cloud down")
		require.Equal(t, stored.Token, readFile(t, filepath.Join(out, "token")), "the pod has the stored token")
		require.Zero(t, e.counter(t, "tether_pods_token_requests_total", nil), "a valid stored token is used without asking the cloud")
	})

	t.Run("no token stored waits for the cloud", func(t *testing.T) {
		reboot()
		// The case of a pod whose token the edge never got before the
		// cloud went away.
		s, err := store.Open(ctx, storePath(dir), nil)
		require.NoError(t, err)
		require.NoError(t, s.DeletePodTokens(ctx, uid))
		require.NoError(t, s.Close())
		e = startEdge(outer, id, dir, c.addr, opts)
		require.Eventually(t, func() bool {
			items, err := e.st.Pending(ctx, 100)
			if err != nil {
				return false
			}
			for _, it := range items {
				var ps corev1.PodStatus
				if it.Resource.Kind == "Pod" && it.Resource.UID == uid && json.Unmarshal(it.Data, &ps) == nil &&
					len(ps.ContainerStatuses) == 1 && ps.ContainerStatuses[0].State.Waiting != nil &&
					ps.ContainerStatuses[0].State.Waiting.Reason == "TokenUnavailable" {
					return true
				}
			}
			return false
		}, 60*time.Second, 100*time.Millisecond, "the pod's status waiting for TokenUnavailable is queued for the cloud")
		_, running := runningContainer(ctx, h, uid)
		require.False(t, running, "no container starts without a token")
		require.Positive(t, e.counter(t, "tether_pods_token_requests_total", map[string]string{"result": "failed"}))

		c = startCloud(outer, env.Config, cloudOptions{quicAddr: c.addr, timings: testTimings})
		require.Eventually(t, func() bool {
			_, ok := runningContainer(ctx, h, uid)
			return ok
		}, 90*time.Second, 100*time.Millisecond, "the pod runs once the cloud gives it a token")
		third := readFile(t, filepath.Join(out, "token"))
		st := tokenReview(t, cs, third)
		require.True(t, st.Authenticated, "the new token is not accepted: %s", st.Error)
		require.Eventually(t, func() bool {
			p, err := cs.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
			return err == nil && runningReady(p)
		}, 60*time.Second, 100*time.Millisecond, "the API server sees the pod Running")
	})

	t.Run("deleted pod's tokens removed", func(t *testing.T) {
		require.NoError(t, cs.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}))
		require.Eventually(t, func() bool {
			uids, err := e.st.PodTokenUIDs(ctx)
			return err == nil && len(uids) == 0
		}, 60*time.Second, 100*time.Millisecond, "the deleted pod's tokens leave the store")
	})
}
