package store

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestPodTokensSurviveReopen: a saved token is there after closing and
// reopening the file, a later one for the same pod and projection
// replaces it, a pod's tokens go together, and bad input is refused
// without touching what is stored, and without the token in the error.
func TestPodTokensSurviveReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "edge.db")
	s, err := Open(ctx, path, nil)
	require.NoError(t, err)
	issued := time.Unix(1798761600, 0)
	one := PodToken{PodUID: "uid-a", Key: "kube-api-access/token", Request: "r1", Token: "jwt-one", IssuedAt: issued, ExpiresAt: issued.Add(time.Hour)}
	require.NoError(t, s.SavePodToken(ctx, one))
	require.NoError(t, s.SavePodToken(ctx, PodToken{PodUID: "uid-a", Key: "vault/token", Request: "r2", Token: "jwt-vault", IssuedAt: issued, ExpiresAt: issued.Add(time.Hour)}))
	require.NoError(t, s.SavePodToken(ctx, PodToken{PodUID: "uid-b", Key: "kube-api-access/token", Request: "r1", Token: "jwt-b", IssuedAt: issued, ExpiresAt: issued.Add(time.Hour)}))
	require.NoError(t, s.Close())

	s, err = Open(ctx, path, nil)
	require.NoError(t, err)
	defer s.Close()
	got, ok, err := s.PodToken(ctx, "uid-a", "kube-api-access/token")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, one.Token, got.Token)
	require.Equal(t, one.Request, got.Request)
	require.True(t, got.IssuedAt.Equal(one.IssuedAt) && got.ExpiresAt.Equal(one.ExpiresAt))
	require.NotContains(t, got.String(), "jwt", "String hides the token")

	two := one
	two.Token, two.IssuedAt, two.ExpiresAt = "jwt-two", issued.Add(time.Hour), issued.Add(2*time.Hour)
	require.NoError(t, s.SavePodToken(ctx, two))
	got, _, err = s.PodToken(ctx, "uid-a", "kube-api-access/token")
	require.NoError(t, err)
	require.Equal(t, "jwt-two", got.Token)

	bad := []PodToken{
		{Key: "k", Token: "jwt-x", IssuedAt: issued, ExpiresAt: issued.Add(time.Hour)},
		{PodUID: "uid-a", Token: "jwt-x", IssuedAt: issued, ExpiresAt: issued.Add(time.Hour)},
		{PodUID: "uid-a", Key: "kube-api-access/token", IssuedAt: issued, ExpiresAt: issued.Add(time.Hour)},
		{PodUID: "uid-a", Key: "kube-api-access/token", Token: "jwt-x", IssuedAt: issued, ExpiresAt: issued},
		{PodUID: "uid-a", Key: "kube-api-access/token", Token: "jwt-" + strings.Repeat("x", maxTokenBytes), IssuedAt: issued, ExpiresAt: issued.Add(time.Hour)},
	}
	for _, b := range bad {
		err := s.SavePodToken(ctx, b)
		require.ErrorIs(t, err, ErrInvalid)
		require.NotContains(t, err.Error(), "jwt-", "an error never carries the token")
	}
	got, _, err = s.PodToken(ctx, "uid-a", "kube-api-access/token")
	require.NoError(t, err)
	require.Equal(t, "jwt-two", got.Token, "refused input changes nothing")

	uids, err := s.PodTokenUIDs(ctx)
	require.NoError(t, err)
	require.Equal(t, []string{"uid-a", "uid-b"}, uids)
	require.NoError(t, s.DeletePodTokens(ctx, "uid-a"))
	for _, key := range []string{"kube-api-access/token", "vault/token"} {
		_, ok, err := s.PodToken(ctx, "uid-a", key)
		require.NoError(t, err)
		require.False(t, ok, "%s of the deleted pod is gone", key)
	}
	_, ok, err = s.PodToken(ctx, "uid-b", "kube-api-access/token")
	require.NoError(t, err)
	require.True(t, ok, "another pod's token stays")
}
