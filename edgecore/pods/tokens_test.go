package pods

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/edgecore/store"
)

func TestTokenRefreshAt(t *testing.T) {
	iat := time.Unix(1798761600, 0)
	for _, tc := range []struct {
		lifetime, want time.Duration
	}{
		{time.Hour, 48 * time.Minute},          // 80 % of an hour
		{10 * time.Minute, 8 * time.Minute},    // the API server's minimum
		{48 * time.Hour, 24 * time.Hour},       // 24 h comes first
		{365 * 24 * time.Hour, 24 * time.Hour}, // an extended token
	} {
		require.Equal(t, iat.Add(tc.want), tokenRefreshAt(iat, iat.Add(tc.lifetime)), "lifetime %s", tc.lifetime)
	}
}

// cloudScript stands in for the cloud's answers (the real path, through
// the tunnel to the API server, is tests/e2e TestServiceAccountTokens):
// it answers each request with a new token valid for the lifetime asked,
// from now, or with err.
type cloudScript struct {
	clock *clocktesting.FakePassiveClock
	err   error
	asked []message.TokenRequest
}

func (c *cloudScript) RequestToken(_ context.Context, _, _ string, req message.TokenRequest) (message.Token, error) {
	c.asked = append(c.asked, req)
	if c.err != nil {
		return message.Token{}, c.err
	}
	exp := c.clock.Now().Add(time.Duration(req.ExpirationSeconds) * time.Second)
	return message.Token{Token: "jwt-" + strconv.Itoa(len(c.asked)), ExpiresUnix: exp.Unix(), ExpirationSeconds: req.ExpirationSeconds}, nil
}

// TestTokens: the decisions of the token cache over a real store file:
// asked once, then served from memory; after a restart from the store
// without asking; refreshed at 80 %, keeping the valid token while the
// refresh fails; none when expired and the cloud fails (the pod waits); a
// changed projection is asked anew; a pod's tokens go with it.
func TestTokens(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "edge.db")
	st, err := store.Open(ctx, path, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = st.Close() })
	clk := clocktesting.NewFakePassiveClock(time.Unix(1798761600, 0))
	cloud := &cloudScript{clock: clk}
	logger := slog.New(slog.DiscardHandler)
	newCache := func() *tokens { return newTokens(cloud, st, clk, logger, ratelog.New(0, nil)) }
	tk := newCache()
	exp := int64(3600)
	src := &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: &exp}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web", UID: "uid-1"}, Spec: corev1.PodSpec{ServiceAccountName: "app"}}

	tok, refresh, err := tk.token(ctx, pod, "kube-api-access", src)
	require.NoError(t, err)
	require.Equal(t, "jwt-1", tok)
	require.Equal(t, clk.Now().Add(48*time.Minute), refresh)
	require.Equal(t, []message.TokenRequest{{Pod: "web", PodUID: "uid-1", ExpirationSeconds: 3600}}, cloud.asked)
	_, _, err = tk.token(ctx, pod, "kube-api-access", src)
	require.NoError(t, err)
	require.Len(t, cloud.asked, 1, "a current token is not asked again")

	// A restart: a new cache over the same store, the cloud unreachable.
	cloud.err = errors.New("syncer: not connected to the cloud")
	tk = newCache()
	tok, _, err = tk.token(ctx, pod, "kube-api-access", src)
	require.NoError(t, err)
	require.Equal(t, "jwt-1", tok, "the stored token serves while valid")
	require.Len(t, cloud.asked, 1)

	// At 80 % a refresh is due; while it fails the valid token stays, and
	// it is tried again soon.
	clk.SetTime(clk.Now().Add(50 * time.Minute))
	tok, again, err := tk.token(ctx, pod, "kube-api-access", src)
	require.NoError(t, err)
	require.Equal(t, "jwt-1", tok)
	require.Equal(t, clk.Now().Add(tokenRetry), again)
	require.Len(t, cloud.asked, 2)
	cloud.err = nil
	tok, _, err = tk.token(ctx, pod, "kube-api-access", src)
	require.NoError(t, err)
	require.Equal(t, "jwt-3", tok, "refreshed")
	got, ok, err := st.PodToken(ctx, "uid-1", "kube-api-access/token")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, "jwt-3", got.Token, "the refreshed token is stored")

	// Expired and the cloud fails: no token, the pod waits.
	cloud.err = errors.New("refused")
	clk.SetTime(clk.Now().Add(2 * time.Hour))
	_, _, err = tk.token(ctx, pod, "kube-api-access", src)
	var te *tokenError
	require.ErrorAs(t, err, &te)
	cloud.err = nil

	// Another audience is another request, never the stored token.
	vault := &corev1.ServiceAccountTokenProjection{Path: "token", Audience: "vault", ExpirationSeconds: &exp}
	n := len(cloud.asked)
	_, _, err = tk.token(ctx, pod, "kube-api-access", vault)
	require.NoError(t, err)
	require.Len(t, cloud.asked, n+1)
	require.Equal(t, []string{"vault"}, cloud.asked[n].Audiences)

	// A pod without a service account cannot have one.
	_, _, err = tk.token(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "x", UID: "uid-x"}}, "v", src)
	require.ErrorAs(t, err, &te)

	// Another pod's tokens stay when the first's go; prune removes what
	// the store's pods do not name.
	other := pod.DeepCopy()
	other.UID = "uid-2"
	_, _, err = tk.token(ctx, other, "kube-api-access", src)
	require.NoError(t, err)
	require.NoError(t, tk.drop(ctx, "uid-1"))
	uids, err := st.PodTokenUIDs(ctx)
	require.NoError(t, err)
	require.Equal(t, []string{"uid-2"}, uids)
	require.NoError(t, tk.prune(ctx, map[string]bool{"uid-3": true}))
	uids, err = st.PodTokenUIDs(ctx)
	require.NoError(t, err)
	require.Empty(t, uids)
	n = len(cloud.asked)
	_, _, err = tk.token(ctx, other, "kube-api-access", src)
	require.NoError(t, err)
	require.Len(t, cloud.asked, n+1, "a pruned token is gone from memory too")
}
