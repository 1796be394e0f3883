package cri

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/store"
)

// The cache answers what was written or read once without SQLite (the
// store is closed under it), forgets a sandbox's containers with it, and
// never caches what the map refused.
func TestIDCache(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "edge.db")
	st, err := store.Open(ctx, path, nil)
	require.NoError(t, err)
	require.NoError(t, st.RuntimeIDs().PutContainer(ctx, "old-ctr", "old-sb", BackendVM)) // before this cache
	c := newIDCache(st.RuntimeIDs())
	require.NoError(t, c.PutSandbox(ctx, "sb", BackendDefault))
	require.NoError(t, c.PutContainer(ctx, "ctr", "sb", BackendDefault))
	require.Error(t, c.PutSandbox(ctx, "", BackendDefault), "refused by the map")
	r, ok, err := c.Lookup(ctx, "old-ctr")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, BackendVM, r.Backend)

	require.NoError(t, st.Close())
	for id, want := range map[string]string{"sb": BackendDefault, "ctr": BackendDefault, "old-ctr": BackendVM} {
		r, ok, err := c.Lookup(ctx, id)
		require.NoError(t, err, id)
		require.True(t, ok, id)
		require.Equal(t, want, r.Backend, id)
	}
	_, _, err = c.Lookup(ctx, "")
	require.Error(t, err, "a miss asks the (closed) store")

	st, err = store.Open(ctx, path, nil)
	require.NoError(t, err)
	defer func() { require.NoError(t, st.Close()) }()
	c = newIDCache(st.RuntimeIDs())
	for _, id := range []string{"sb", "ctr"} {
		_, ok, err := c.Lookup(ctx, id)
		require.NoError(t, err)
		require.True(t, ok)
	}
	require.NoError(t, c.Delete(ctx, "sb"))
	for _, id := range []string{"sb", "ctr"} {
		_, ok, err := c.Lookup(ctx, id)
		require.NoError(t, err)
		require.False(t, ok, "%s is forgotten with its sandbox", id)
	}
}
