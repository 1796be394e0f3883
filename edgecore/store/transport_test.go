package store

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestLastTransportSurvivesReopen: the transport is absent at first,
// survives closing and reopening the file, is replaced by a later one, and
// a bad value is refused without touching what is stored (the outbox
// sequence in the same table included).
func TestLastTransportSurvivesReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "edge.db")
	s, err := Open(ctx, path, nil)
	require.NoError(t, err)
	got, err := s.LastTransport(ctx)
	require.NoError(t, err)
	require.Equal(t, TransportUnknown, got)
	require.NoError(t, s.SetLastTransport(ctx, TransportWebSocket))
	require.NoError(t, s.Close())

	s, err = Open(ctx, path, nil)
	require.NoError(t, err)
	defer s.Close()
	got, err = s.LastTransport(ctx)
	require.NoError(t, err)
	require.Equal(t, TransportWebSocket, got)

	var seq int64
	require.NoError(t, s.r.QueryRowContext(ctx, `SELECT value FROM meta WHERE name = 'outbox_seq'`).Scan(&seq))
	for _, bad := range []Transport{TransportUnknown, 3, -1} {
		require.ErrorIs(t, s.SetLastTransport(ctx, bad), ErrInvalid)
	}
	got, err = s.LastTransport(ctx)
	require.NoError(t, err)
	require.Equal(t, TransportWebSocket, got, "a refused value changes nothing")
	var seqAfter int64
	require.NoError(t, s.r.QueryRowContext(ctx, `SELECT value FROM meta WHERE name = 'outbox_seq'`).Scan(&seqAfter))
	require.Equal(t, seq, seqAfter)

	require.NoError(t, s.SetLastTransport(ctx, TransportQUIC))
	got, err = s.LastTransport(ctx)
	require.NoError(t, err)
	require.Equal(t, TransportQUIC, got)
}
