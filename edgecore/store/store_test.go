package store

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/tests/testlog"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// openStore opens a store at path and closes it when the test ends.
func openStore(t testing.TB, path string) *Store {
	t.Helper()
	s, err := Open(t.Context(), path, testlog.New())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, s.Close()) })
	return s
}

// rawDB opens the file with the driver alone, as another program would.
func rawDB(t *testing.T, path string) *sql.DB {
	t.Helper()
	db := sql.OpenDB(newConnector(path, url.Values{}, ""))
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func pragma(t *testing.T, db *sql.DB, name string) string {
	t.Helper()
	var v string
	require.NoError(t, db.QueryRowContext(t.Context(), "PRAGMA "+name).Scan(&v))
	return v
}

func TestOpenSettings(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edge.db")
	s := openStore(t, path)

	for name, want := range map[string]string{
		"journal_mode":       "wal",
		"synchronous":        "2", // FULL; the driver's default would be NORMAL
		"foreign_keys":       "1",
		"busy_timeout":       fmt.Sprint(busyTimeoutMS),
		"journal_size_limit": fmt.Sprint(journalSizeLimit),
		"application_id":     fmt.Sprint(applicationID),
		"user_version":       fmt.Sprint(len(migrations())),
	} {
		require.Equal(t, want, pragma(t, s.w, name), "writer PRAGMA %s", name)
	}
	require.Equal(t, "1", pragma(t, s.r, "query_only"))
	_, err := s.r.ExecContext(t.Context(), `DELETE FROM objects`)
	require.Error(t, err, "the read pool must not write")

	info, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm())
}

func TestOpenInvalidPath(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		path string
	}{
		{"empty", ""},
		{"directory", dir},
		{"missing directory", filepath.Join(dir, "missing", "edge.db")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Open(t.Context(), tt.path, nil)
			require.Error(t, err)
			require.Nil(t, s)
		})
	}
}

func TestReopenKeepsDataAndSchema(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "edge.db")
	s, err := Open(ctx, path, testlog.New())
	require.NoError(t, err)
	o := configMap("default", "a", "1")
	require.NoError(t, s.Apply(ctx, []Change{upsert(o)}))
	_, err = s.Enqueue(ctx, OutboxItem{Op: message.OpStatus, Resource: nodeResource("n1"), Data: []byte(`{}`)})
	require.NoError(t, err)
	require.NoError(t, s.Close())
	require.NoError(t, s.Close(), "Close is idempotent")

	for range 2 {
		s, err = Open(ctx, path, testlog.New())
		require.NoError(t, err)
		require.Equal(t, fmt.Sprint(len(migrations())), pragma(t, s.w, "user_version"))
		got, ok, err := s.Get(ctx, o.Key())
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, o, got)
		n, err := s.PendingCount(ctx)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		require.NoError(t, s.Close())
	}
}

// fileState is what must not change when Open refuses a file: the bytes of
// every file in the directory.
func fileState(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	out := map[string][32]byte{}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		out[e.Name()] = sha256.Sum256(b)
	}
	return out
}

func TestOpenRefusesForeignFiles(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
		wantErr error // nil: any error
	}{
		{
			name: "newer schema version",
			prepare: func(t *testing.T, path string) {
				s, err := Open(t.Context(), path, testlog.New())
				require.NoError(t, err)
				require.NoError(t, s.Apply(t.Context(), []Change{upsert(configMap("default", "a", "1"))}))
				require.NoError(t, s.Close())
				db := rawDB(t, path)
				_, err = db.ExecContext(t.Context(), fmt.Sprintf("PRAGMA user_version = %d", len(migrations())+1))
				require.NoError(t, err)
				require.NoError(t, db.Close())
			},
			wantErr: ErrSchemaTooNew,
		},
		{
			name: "other program's database",
			prepare: func(t *testing.T, path string) {
				db := rawDB(t, path)
				_, err := db.ExecContext(t.Context(), `CREATE TABLE accounts (id INTEGER PRIMARY KEY)`)
				require.NoError(t, err)
				require.NoError(t, db.Close())
			},
			wantErr: ErrNotStore,
		},
		{
			name: "other program's versioned database",
			prepare: func(t *testing.T, path string) {
				db := rawDB(t, path)
				_, err := db.ExecContext(t.Context(), `PRAGMA application_id = 42; PRAGMA user_version = 1`)
				require.NoError(t, err)
				require.NoError(t, db.Close())
			},
			wantErr: ErrNotStore,
		},
		{
			name: "not a database",
			prepare: func(t *testing.T, path string) {
				require.NoError(t, os.WriteFile(path, []byte("this is not a SQLite file, just some text that is long enough."), 0o600))
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "edge.db")
			tt.prepare(t, path)
			before := fileState(t, dir)

			s, err := Open(t.Context(), path, testlog.New())
			require.Error(t, err)
			require.Nil(t, s)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
			}
			require.Equal(t, before, fileState(t, dir), "a refused file must be left unchanged")
		})
	}
}

func TestMigrate(t *testing.T) {
	step := func(v int, sql string) migration {
		return migration{version: v, name: fmt.Sprintf("step %d", v), sql: sql}
	}
	v1 := step(1, `CREATE TABLE a (x INTEGER); PRAGMA application_id = 1413829704;`)
	v2 := step(2, `CREATE TABLE b (x INTEGER)`)
	v3 := step(3, `INSERT INTO a (x) VALUES (3)`)
	// The second statement fails, so the first must be rolled back.
	bad4 := step(4, `INSERT INTO a (x) VALUES (4); INSERT INTO missing (x) VALUES (4)`)

	tests := []struct {
		name        string
		steps       []migration
		wantErr     error
		anyErr      bool
		wantVersion int
		wantRows    int // rows in table a afterwards
	}{
		{name: "fresh file gets v1 and v2", steps: []migration{v1, v2}, wantVersion: 2},
		{name: "reopen applies nothing", steps: []migration{v1, v2}, wantVersion: 2},
		{name: "new step applied alone", steps: []migration{v1, v2, v3}, wantVersion: 3, wantRows: 1},
		{name: "reopen again is idempotent", steps: []migration{v1, v2, v3}, wantVersion: 3, wantRows: 1},
		{name: "failing step rolled back", steps: []migration{v1, v2, v3, bad4}, anyErr: true, wantVersion: 3, wantRows: 1},
		{name: "older build refuses", steps: []migration{v1, v2}, wantErr: ErrSchemaTooNew, wantVersion: 3, wantRows: 1},
		{name: "misnumbered steps", steps: []migration{v1, v3}, anyErr: true, wantVersion: 3, wantRows: 1},
	}
	path := filepath.Join(t.TempDir(), "migrate.db")
	// The cases run in order on the same file.
	for _, tt := range tests {
		db := rawDB(t, path)
		db.SetMaxOpenConns(1)
		version, err := prepare(t.Context(), db, tt.steps, testlog.New())
		switch {
		case tt.wantErr != nil:
			require.ErrorIs(t, err, tt.wantErr, tt.name)
		case tt.anyErr:
			require.Error(t, err, tt.name)
		default:
			require.NoError(t, err, tt.name)
			require.Equal(t, tt.wantVersion, version, tt.name)
		}
		require.Equal(t, fmt.Sprint(tt.wantVersion), pragma(t, db, "user_version"), tt.name)
		var rows int
		require.NoError(t, db.QueryRowContext(t.Context(), `SELECT count(*) FROM a`).Scan(&rows), tt.name)
		require.Equal(t, tt.wantRows, rows, tt.name)
		require.NoError(t, db.Close())
	}
}

func TestMigrationsNumbered(t *testing.T) {
	steps := migrations()
	require.NotEmpty(t, steps)
	for i, m := range steps {
		require.Equal(t, i+1, m.version, m.name)
	}
	require.True(t, slices.IsSortedFunc(steps, func(a, b migration) int { return a.version - b.version }))
}

func TestReadsDoNotWaitForWriter(t *testing.T) {
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	require.NoError(t, s.Apply(ctx, []Change{upsert(configMap("default", "a", "1"))}))

	// Hold the writer in an open transaction with an uncommitted change.
	tx, err := s.w.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = tx.ExecContext(ctx, `DELETE FROM objects`)
	require.NoError(t, err)

	n, err := s.Count(ctx)
	require.NoError(t, err)
	require.Equal(t, 1, n, "readers see the last committed state")
	require.NoError(t, tx.Rollback())
}

func TestClosedStore(t *testing.T) {
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "edge.db"), nil)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	_, err = s.Count(t.Context())
	require.Error(t, err)
	require.Error(t, s.Apply(t.Context(), []Change{upsert(configMap("default", "a", "1"))}))
}
