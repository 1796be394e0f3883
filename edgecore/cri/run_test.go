package cri_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/cri"
	"github.com/tetheredge/tether/edgecore/store"
)

// idle is a backend no call reaches.
type idle struct{ cri.Backend }

// TestRunStoppedAtOnce: a shim whose context ends before its gRPC server
// started serving ends cleanly (the stop can come before Serve, which
// then reports the server stopped: no error, the socket removed).
func TestRunStoppedAtOnce(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "edge.db"), nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = st.Close() })
	for i := range 100 {
		srv, err := cri.New(cri.Config{Listen: filepath.Join(shortTempDir(t), "cri.sock")}, cri.Backends{Default: idle{}}, st.RuntimeIDs())
		require.NoError(t, err)
		stopped, cancel := context.WithCancel(ctx)
		cancel()
		require.NoError(t, srv.Run(stopped), "run %d", i)
	}
}
