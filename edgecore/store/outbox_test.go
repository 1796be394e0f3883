package store

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/tests/testlog"
)

func statusItem(name, status string) OutboxItem {
	return OutboxItem{Op: message.OpStatus, Resource: nodeResource(name), Data: []byte(`{"status":"` + status + `"}`)}
}

func TestOutboxCoalesces(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "edge.db")
	s, err := Open(ctx, path, testlog.New())
	require.NoError(t, err)

	a1, a2, b := statusItem("a", "v1"), statusItem("a", "v2"), statusItem("b", "v1")
	seqA1, err := s.Enqueue(ctx, a1)
	require.NoError(t, err)
	seqA2, err := s.Enqueue(ctx, a2)
	require.NoError(t, err)
	seqB, err := s.Enqueue(ctx, b)
	require.NoError(t, err)
	require.Less(t, seqA1, seqA2)
	require.Less(t, seqA2, seqB)

	a2.Seq, b.Seq = seqA2, seqB
	got, err := s.Pending(ctx, 10)
	require.NoError(t, err)
	require.Equal(t, []OutboxItem{a2, b}, got, "A(v2) replaced A(v1)")
	got, err = s.Pending(ctx, 1)
	require.NoError(t, err)
	require.Equal(t, []OutboxItem{a2}, got)

	// The ack of the replaced item must not remove its replacement.
	require.NoError(t, s.Done(ctx, a1.Key(), seqA1))
	got, err = s.Pending(ctx, 10)
	require.NoError(t, err)
	require.Equal(t, []OutboxItem{a2, b}, got)

	// Survives a restart.
	require.NoError(t, s.Close())
	s, err = Open(ctx, path, testlog.New())
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	got, err = s.Pending(ctx, 10)
	require.NoError(t, err)
	require.Equal(t, []OutboxItem{a2, b}, got)

	require.NoError(t, s.Done(ctx, a2.Key(), seqA2))
	got, err = s.Pending(ctx, 10)
	require.NoError(t, err)
	require.Equal(t, []OutboxItem{b}, got)
	n, err := s.PendingCount(ctx)
	require.NoError(t, err)
	require.Equal(t, 1, n)

	// Seqs keep growing after acks and restarts: a late duplicate ack of an
	// old seq can never match a new item.
	seqA3, err := s.Enqueue(ctx, statusItem("a", "v3"))
	require.NoError(t, err)
	require.Greater(t, seqA3, seqB)
	require.NoError(t, s.Done(ctx, a2.Key(), seqA2))
	n, err = s.PendingCount(ctx)
	require.NoError(t, err)
	require.Equal(t, 2, n)

	require.NoError(t, s.Done(ctx, b.Key(), seqB))
	require.NoError(t, s.Done(ctx, b.Key(), seqB), "a duplicate ack is harmless")
	require.NoError(t, s.Done(ctx, b.Key(), ^uint64(0)))
	got, err = s.Pending(ctx, 10)
	require.NoError(t, err)
	require.Len(t, got, 1)
	require.Equal(t, seqA3, got[0].Seq)
}

func TestOutboxDeleteWithoutData(t *testing.T) {
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	item := OutboxItem{Op: message.OpDelete, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "default", Name: "p"}}
	seq, err := s.Enqueue(ctx, item)
	require.NoError(t, err)
	got, err := s.Pending(ctx, 10)
	require.NoError(t, err)
	require.Len(t, got, 1)
	require.Equal(t, seq, got[0].Seq)
	require.Equal(t, message.OpDelete, got[0].Op)
	require.Equal(t, item.Resource, got[0].Resource)
	require.Empty(t, got[0].Data)
}

func TestOutboxValidation(t *testing.T) {
	with := func(f func(it *OutboxItem)) OutboxItem {
		it := statusItem("a", "v1")
		f(&it)
		return it
	}
	tests := []struct {
		name    string
		item    OutboxItem
		wantMsg string
	}{
		{"op none", with(func(it *OutboxItem) { it.Op = message.OpNone }), "op"},
		{"unknown op", with(func(it *OutboxItem) { it.Op = 77 }), "op"},
		{"empty kind", with(func(it *OutboxItem) { it.Resource.Kind = "" }), "kind is empty"},
		{"empty name", with(func(it *OutboxItem) { it.Resource.Name = "" }), "name is empty"},
		{"empty data", with(func(it *OutboxItem) { it.Data = nil }), "data is empty"},
		{"data too large", with(func(it *OutboxItem) { it.Data = make([]byte, MaxDataLen+1) }), "limit"},
		{"slash in name", with(func(it *OutboxItem) { it.Resource.Name = "x/y" }), "'/'"},
	}
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.Enqueue(ctx, tt.item)
			require.ErrorIs(t, err, ErrInvalid)
			require.ErrorContains(t, err, tt.wantMsg)
			n, err := s.PendingCount(ctx)
			require.NoError(t, err)
			require.Zero(t, n)
		})
	}
	_, err := s.Pending(ctx, 0)
	require.ErrorIs(t, err, ErrInvalid)
}
