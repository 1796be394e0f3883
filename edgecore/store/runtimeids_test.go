package store

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/tests/testlog"
)

func TestRuntimeIDsSurviveReopen(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "edge.db")
	s, err := Open(ctx, path, testlog.New())
	require.NoError(t, err)
	m := s.RuntimeIDs()
	require.NoError(t, m.PutSandbox(ctx, "sb1", "containerd"))
	require.NoError(t, m.PutContainer(ctx, "c1", "sb1", "containerd"))
	require.NoError(t, m.PutContainer(ctx, "c2", "sb1", "containerd"))
	require.NoError(t, m.PutSandbox(ctx, "sb2", "vm"))
	require.NoError(t, m.PutContainer(ctx, "c3", "sb2", "vm"))
	require.NoError(t, s.Close())

	s = openStore(t, path)
	m = s.RuntimeIDs()
	r, ok, err := m.Lookup(ctx, "c1")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, RuntimeContainer, r.Kind)
	require.Equal(t, "containerd", r.Backend)
	require.Equal(t, "sb1", r.SandboxID)
	require.False(t, r.CreatedAt.IsZero())
	r, ok, err = m.Lookup(ctx, "sb2")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, RuntimeID{ID: "sb2", Kind: RuntimeSandbox, Backend: "vm", SandboxID: "sb2", CreatedAt: r.CreatedAt}, r)
	_, ok, err = m.Lookup(ctx, "unknown")
	require.NoError(t, err)
	require.False(t, ok)

	// Deleting a sandbox deletes its containers, not the other sandbox's.
	require.NoError(t, m.Delete(ctx, "sb1"))
	require.NoError(t, m.Delete(ctx, "sb1"), "deleting twice is not an error")
	all, err := m.List(ctx)
	require.NoError(t, err)
	var ids []string
	for _, r := range all {
		ids = append(ids, r.ID)
	}
	require.Equal(t, []string{"sb2", "c3"}, ids)

	// A container alone.
	require.NoError(t, m.Delete(ctx, "c3"))
	_, ok, err = m.Lookup(ctx, "sb2")
	require.NoError(t, err)
	require.True(t, ok)
}

func TestRuntimeIDsRefuseBadInput(t *testing.T) {
	ctx := t.Context()
	m := openStore(t, filepath.Join(t.TempDir(), "edge.db")).RuntimeIDs()
	for name, err := range map[string]error{
		"empty id":         m.PutSandbox(ctx, "", "containerd"),
		"empty backend":    m.PutSandbox(ctx, "sb", ""),
		"empty sandbox":    m.PutContainer(ctx, "c", "", "containerd"),
		"long id":          m.PutSandbox(ctx, strings.Repeat("a", MaxRuntimeIDLen+1), "containerd"),
		"invalid utf-8 id": m.PutContainer(ctx, "c\xff", "sb", "containerd"),
	} {
		require.ErrorIs(t, err, ErrInvalid, name)
	}
	all, err := m.List(ctx)
	require.NoError(t, err)
	require.Empty(t, all)
}

// A file written at schema version 1 (before the shim) gets the runtime id
// table on open, and keeps its objects.
func TestMigrateV1FileToRuntimeIDs(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "edge.db")
	require.NoError(t, createFile(path, testlog.New()))
	db := rawDB(t, path)
	db.SetMaxOpenConns(1)
	version, err := prepare(ctx, db, migrations()[:1], testlog.New())
	require.NoError(t, err)
	require.Equal(t, 1, version)
	_, err = db.ExecContext(ctx, `INSERT INTO meta (name, value) VALUES ('probe', 7)`)
	require.NoError(t, err)
	require.NoError(t, db.Close())

	s := openStore(t, path)
	require.Equal(t, fmt.Sprint(len(migrations())), pragma(t, s.w, "user_version"))
	var probe int
	require.NoError(t, s.r.QueryRowContext(ctx, `SELECT value FROM meta WHERE name = 'probe'`).Scan(&probe))
	require.Equal(t, 7, probe)
	require.NoError(t, s.RuntimeIDs().PutSandbox(ctx, "sb", "containerd"))
}

// The runtime id map commits with synchronous=NORMAL; every other write
// must still commit with FULL on the writer connection afterwards.
func TestRuntimeIDsLeaveWriterFull(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	m := s.RuntimeIDs()
	require.NoError(t, m.PutSandbox(t.Context(), "sb", "containerd"))
	require.Equal(t, "2", pragma(t, s.w, "synchronous"), "FULL after a put")
	require.NoError(t, m.Delete(t.Context(), "sb"))
	require.Equal(t, "2", pragma(t, s.w, "synchronous"), "FULL after a delete")
}

// BenchmarkRuntimeIDsPut is the cost the shim adds to RunPodSandbox for
// its record: one committed write (synchronous=NORMAL: no fsync).
func BenchmarkRuntimeIDsPut(b *testing.B) {
	m := openStore(b, filepath.Join(b.TempDir(), "edge.db")).RuntimeIDs()
	for i := range b.N {
		require.NoError(b, m.PutSandbox(b.Context(), fmt.Sprintf("sandbox-%d", i), "containerd"))
	}
}
