package store

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestTicketsSurviveReopen: a saved ticket is there after closing and
// reopening the file, a later one replaces it, nil removes it, keys are
// independent, and bad input is refused without touching what is stored.
func TestTicketsSurviveReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "edge.db")
	s, err := Open(ctx, path, nil)
	require.NoError(t, err)
	got, err := s.LoadTicket(ctx, "quic/cloud")
	require.NoError(t, err)
	require.Nil(t, got)
	require.NoError(t, s.SaveTicket(ctx, "quic/cloud", []byte("one")))
	require.NoError(t, s.SaveTicket(ctx, "websocket/cloud", []byte("ws")))
	require.NoError(t, s.Close())

	s, err = Open(ctx, path, nil)
	require.NoError(t, err)
	defer s.Close()
	got, err = s.LoadTicket(ctx, "quic/cloud")
	require.NoError(t, err)
	require.Equal(t, "one", string(got))

	require.NoError(t, s.SaveTicket(ctx, "quic/cloud", []byte("two")))
	require.ErrorIs(t, s.SaveTicket(ctx, "", []byte("x")), ErrInvalid)
	require.ErrorIs(t, s.SaveTicket(ctx, "quic/cloud", []byte(strings.Repeat("x", maxTicketBytes+1))), ErrInvalid)
	got, err = s.LoadTicket(ctx, "quic/cloud")
	require.NoError(t, err)
	require.Equal(t, "two", string(got), "a refused save changes nothing")

	require.NoError(t, s.SaveTicket(ctx, "quic/cloud", nil))
	got, err = s.LoadTicket(ctx, "quic/cloud")
	require.NoError(t, err)
	require.Nil(t, got)
	got, err = s.LoadTicket(ctx, "websocket/cloud")
	require.NoError(t, err)
	require.Equal(t, "ws", string(got))
}
