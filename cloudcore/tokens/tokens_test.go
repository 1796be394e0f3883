package tokens

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/promtest"
)

// cp is the real etcd and kube-apiserver the tests share (with
// service-account signing keys; no controller manager, so the tests make
// their ServiceAccounts themselves).
var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

const waitFor = 30 * time.Second

// tokenPosts counts the TokenRequests the issuer's client makes.
type tokenPosts struct {
	mu   sync.Mutex
	n    int
	next http.RoundTripper
}

func (p *tokenPosts) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/token") {
		p.mu.Lock()
		p.n++
		p.mu.Unlock()
	}
	return p.next.RoundTrip(r)
}

func (p *tokenPosts) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

func uniqueName(prefix string) string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// apiAccessPod is a pod with the volume the ServiceAccount admission
// plugin injects (kube-api-access-*), running as sa, bound to node.
func apiAccessPod(name, node, sa string) *corev1.Pod {
	exp := int64(3607)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app"}},
			Volumes: []corev1.Volume{{Name: "kube-api-access-x", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
				Sources: []corev1.VolumeProjection{
					{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: &exp}},
					{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "kube-root-ca.crt"},
						Items: []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}}}},
				},
			}}}, {Name: "vault", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
				Sources: []corev1.VolumeProjection{
					{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "vault-token", Audience: "vault"}},
				},
			}}}},
		},
	}
}

func request(t *testing.T, ns, sa string, req message.TokenRequest) *message.Message {
	t.Helper()
	payload, err := message.NewCodec(0).Append(nil, &req)
	require.NoError(t, err)
	return &message.Message{ID: 1 << 62, Kind: message.KindRenew, Resource: message.TokenResource(ns, sa), Payload: payload}
}

// TestToken: a node gets tokens for its own pods only, bound to the pod,
// for the audiences its projections name; the API server accepts them
// (TokenReview) as the pod's service account. Every refusal is counted
// by reason and makes no request to the API server.
func TestToken(t *testing.T) {
	env := cp.Env(t)
	ctx := context.Background()
	adminCfg := rest.CopyConfig(env.Config)
	adminCfg.QPS, adminCfg.Burst = 1000, 1000
	admin, err := kubernetes.NewForConfig(adminCfg)
	require.NoError(t, err)
	ns := env.Namespace(t)
	node, other := uniqueName("edge-tok"), uniqueName("edge-other")
	for _, n := range []string{node, other} {
		_, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name: n, Labels: map[string]string{catalog.DefaultEdgeLabel: ""},
		}}, metav1.CreateOptions{})
		require.NoError(t, err)
		t.Cleanup(func() { _ = admin.CoreV1().Nodes().Delete(context.Background(), n, metav1.DeleteOptions{}) })
	}
	for _, sa := range []string{"app", "other"} {
		_, err := admin.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	mine, err := admin.CoreV1().Pods(ns).Create(ctx, apiAccessPod("mine", node, "app"), metav1.CreateOptions{})
	require.NoError(t, err)
	theirs, err := admin.CoreV1().Pods(ns).Create(ctx, apiAccessPod("theirs", other, "app"), metav1.CreateOptions{})
	require.NoError(t, err)

	cat, err := catalog.New(admin, catalog.Config{Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- cat.Run(cctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })
	require.NoError(t, cat.WaitForSync(cctx))
	for _, p := range []struct {
		node string
		pod  *corev1.Pod
	}{{node, mine}, {other, theirs}} {
		require.Eventually(t, func() bool {
			uid, _, ok := cat.Version(p.node, objsync.Key{Kind: "Pod", Namespace: ns, Name: p.pod.Name})
			return ok && uid == string(p.pod.UID)
		}, waitFor, 10*time.Millisecond, "catalog never cached pod %s", p.pod.Name)
	}

	posts := &tokenPosts{}
	issuerCfg := rest.CopyConfig(env.Config)
	issuerCfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { posts.next = rt; return posts })
	client, err := kubernetes.NewForConfig(issuerCfg)
	require.NoError(t, err)
	reg := promtest.NewRegistry()
	iss, err := New(client, cat, Config{Registerer: reg})
	require.NoError(t, err)

	t.Run("own pod", func(t *testing.T) {
		before := posts.count()
		// 60 s is below the API server's minimum: raised to 10 min.
		payload, err := iss.Token(ctx, node, request(t, ns, "app", message.TokenRequest{Pod: "mine", PodUID: string(mine.UID), ExpirationSeconds: 60}))
		require.NoError(t, err)
		require.Equal(t, before+1, posts.count())
		var tok message.Token
		require.NoError(t, message.NewCodec(0).UnmarshalValue(payload, &tok))
		require.NoError(t, tok.Validate())
		require.Equal(t, int64(600), tok.ExpirationSeconds, "clamped to the 10 min minimum, as kubelet's requests are")
		require.InDelta(t, time.Now().Add(10*time.Minute).Unix(), tok.ExpiresUnix, 120)

		review, err := admin.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: tok.Token},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		require.True(t, review.Status.Authenticated, "the API server does not accept the token: %s", review.Status.Error)
		require.Equal(t, "system:serviceaccount:"+ns+":app", review.Status.User.Username)
		require.Equal(t, authenticationv1.ExtraValue{"mine"}, review.Status.User.Extra["authentication.kubernetes.io/pod-name"])
		require.Equal(t, authenticationv1.ExtraValue{string(mine.UID)}, review.Status.User.Extra["authentication.kubernetes.io/pod-uid"])
		require.Equal(t, 1.0, promtest.Sum(t, reg, "tether_token_requests_total", map[string]string{"result": "issued"}))
	})

	t.Run("audience of a projection", func(t *testing.T) {
		payload, err := iss.Token(ctx, node, request(t, ns, "app", message.TokenRequest{
			Pod: "mine", PodUID: string(mine.UID), Audiences: []string{"vault"}, ExpirationSeconds: 3600,
		}))
		require.NoError(t, err)
		var tok message.Token
		require.NoError(t, message.NewCodec(0).UnmarshalValue(payload, &tok))
		review, err := admin.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: tok.Token, Audiences: []string{"vault"}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		require.True(t, review.Status.Authenticated, "the token is not for audience vault: %s", review.Status.Error)
	})

	refusals := []struct {
		name, reason string
		ns, sa       string
		req          message.TokenRequest
		payload      []byte
	}{
		{"pod of another node", ReasonNotBound, ns, "app", message.TokenRequest{Pod: "theirs", PodUID: string(theirs.UID), ExpirationSeconds: 3607}, nil},
		{"no such pod", ReasonNotBound, ns, "app", message.TokenRequest{Pod: "nobody", PodUID: "x", ExpirationSeconds: 3607}, nil},
		{"wrong uid", ReasonUIDMismatch, ns, "app", message.TokenRequest{Pod: "mine", PodUID: string(theirs.UID), ExpirationSeconds: 3607}, nil},
		{"wrong service account", ReasonServiceAccount, ns, "other", message.TokenRequest{Pod: "mine", PodUID: string(mine.UID), ExpirationSeconds: 3607}, nil},
		{"audience not projected", ReasonNotProjected, ns, "app", message.TokenRequest{Pod: "mine", PodUID: string(mine.UID), Audiences: []string{"evil"}, ExpirationSeconds: 3607}, nil},
		{"longer than projected", ReasonNotProjected, ns, "app", message.TokenRequest{Pod: "mine", PodUID: string(mine.UID), ExpirationSeconds: 86400}, nil},
		{"payload does not decode", ReasonBadRequest, ns, "app", message.TokenRequest{}, []byte{0xc1}},
		{"invalid request", ReasonBadRequest, ns, "app", message.TokenRequest{Pod: "mine", ExpirationSeconds: 3607}, nil},
		{"no namespace", ReasonBadRequest, "", "app", message.TokenRequest{Pod: "mine", PodUID: string(mine.UID), ExpirationSeconds: 3607}, nil},
	}
	for _, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			before := posts.count()
			m := request(t, tc.ns, tc.sa, tc.req)
			if tc.payload != nil {
				m.Payload = tc.payload
			}
			reason := promtest.Sum(t, reg, "tether_token_refused_total", nil) // exists once the first refusal is counted
			_, err := iss.Token(ctx, node, m)
			require.ErrorIs(t, err, dispatch.ErrForbidden)
			require.Equal(t, before, posts.count(), "a refused request must not reach the API server")
			require.Equal(t, reason+1, promtest.Sum(t, reg, "tether_token_refused_total", nil))
			require.GreaterOrEqual(t, promtest.Sum(t, reg, "tether_token_refused_total", map[string]string{"reason": tc.reason}), 1.0)
		})
	}

	t.Run("service account gone", func(t *testing.T) {
		gone, err := admin.CoreV1().Pods(ns).Create(ctx, apiAccessPod("gone", node, "deleted"), metav1.CreateOptions{})
		require.NoError(t, err)
		require.Eventually(t, func() bool {
			_, ok := cat.Get(node, objsync.Key{Kind: "Pod", Namespace: ns, Name: "gone"})
			return ok
		}, waitFor, 10*time.Millisecond)
		_, err = iss.Token(ctx, node, request(t, ns, "deleted", message.TokenRequest{Pod: "gone", PodUID: string(gone.UID), ExpirationSeconds: 3607}))
		require.ErrorIs(t, err, dispatch.ErrRejected, "no such service account is final for this request")
		require.Equal(t, 1.0, promtest.Sum(t, reg, "tether_token_requests_total", map[string]string{"result": "rejected"}))
	})
}

// TestNewDefaults: a nil logger discards, a registration error is
// returned, and the dependencies are required.
func TestNewDefaults(t *testing.T) {
	client, err := kubernetes.NewForConfig(cp.Env(t).Config)
	require.NoError(t, err)
	cat, err := catalog.New(client, catalog.Config{})
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	_, err = New(client, cat, Config{Registerer: reg})
	require.NoError(t, err)
	_, err = New(client, cat, Config{Registerer: reg})
	require.Error(t, err, "registering the metrics twice fails, and New says so")
	_, err = New(nil, cat, Config{})
	require.Error(t, err)
	_, err = New(client, nil, Config{})
	require.Error(t, err)
}
