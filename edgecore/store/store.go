// Package store is EdgeCore's durable state, kept in one SQLite file: the
// Kubernetes objects the cloud sent to this node, so that EdgeCore keeps
// serving them while the cloud is unreachable and across its own restarts,
// and an outbox of writes the edge owes the cloud (node status, lease, pod
// status) that waits while the node is offline.
//
// A write returns only after its transaction has committed in WAL mode with
// synchronous=FULL, so anything EdgeCore acknowledges to the cloud after a
// write returns survives kill -9 and power loss. The one exception is the
// CRI shim's runtime id map, committed with NORMAL: it survives kill -9
// (see runtimeids.go). A batch of changes is
// applied all or nothing. Every input is validated before anything is
// written, and a file written by a newer build or by another program is
// refused without being changed.
//
// The store only stores. It must not do networking, hold a Kubernetes
// client, decode Kubernetes types (object data is opaque JSON to it) or make
// sync decisions: what to apply, acknowledge or send up is the caller's.
package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mattn/go-sqlite3"

	"github.com/tetheredge/tether/common/objsync"
)

// Sentinel errors. Each error the store returns for the reason named wraps
// one of them; check with errors.Is.
var (
	// ErrInvalid is wrapped by every validation error: the input was refused
	// and nothing was written.
	ErrInvalid = errors.New("store: invalid input")
	// ErrSchemaTooNew means the file was written by a newer build whose
	// schema this build does not know. The file is left unchanged.
	ErrSchemaTooNew = errors.New("store: database schema is newer than this build")
	// ErrNotStore means the file is a SQLite database of some other program.
	// The file is left unchanged.
	ErrNotStore = errors.New("store: file is not an edgecore store")
)

const (
	// applicationID marks the file as Tether's ("TETH"); PRAGMA
	// application_id is part of the SQLite header.
	applicationID = 0x54455448
	// busyTimeoutMS is how long a statement waits for a lock held by another
	// connection (in practice: another process wrongly opening the file).
	busyTimeoutMS = 5000
	// journalSizeLimit truncates the WAL back to this size after a
	// checkpoint, so one large sync does not leave a large file behind.
	journalSizeLimit = 64 << 20
	// readConns is the size of the read pool. In WAL mode readers do not
	// wait for the writer, so Get and List keep answering while a batch
	// commits.
	readConns = 4
)

// Store is EdgeCore's durable state. Its methods are safe for concurrent
// use. Writes go through a single connection, so they are serialized; reads
// use a separate pool and see the last committed state.
type Store struct {
	path   string
	logger *slog.Logger
	// w is the one writer connection: every transaction that writes.
	w *sql.DB
	// r is the read pool; its connections are query_only.
	r *sql.DB

	closeOnce sync.Once
	closeErr  error

	// subsMu guards subs, the change subscribers (see Subscribe).
	subsMu sync.Mutex
	subs   map[uint64]func([]objsync.Key)
	subSeq uint64

	metrics metrics // see Register
}

// Open opens the store in the file at path, creating the file if it does
// not exist (mode 0600: the objects include Secrets), and brings its schema
// up to date, one transaction per migration step. It refuses, without
// changing the file, a database whose schema is newer than this build knows
// (ErrSchemaTooNew) and a SQLite database of another program (ErrNotStore).
// A nil logger discards logs. The caller must Close the store.
func Open(ctx context.Context, path string, logger *slog.Logger) (*Store, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if path == "" {
		return nil, fmt.Errorf("open store: %w: empty path", ErrInvalid)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := createFile(abs, logger); err != nil {
		return nil, fmt.Errorf("open store %s: %w", abs, err)
	}

	w := sql.OpenDB(newConnector(abs, url.Values{
		"_synchronous":  {"FULL"},
		"_foreign_keys": {"1"},
		"_busy_timeout": {fmt.Sprint(busyTimeoutMS)},
		"_txlock":       {"immediate"},
	}, fmt.Sprintf("PRAGMA journal_size_limit = %d", journalSizeLimit)))
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	w.SetConnMaxIdleTime(0)

	version, err := prepare(ctx, w, migrations(), logger)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("open store %s: %w", abs, err), w.Close())
	}

	r := sql.OpenDB(newConnector(abs, url.Values{
		"_query_only":   {"1"},
		"_foreign_keys": {"1"},
		"_busy_timeout": {fmt.Sprint(busyTimeoutMS)},
	}, ""))
	r.SetMaxOpenConns(readConns)
	r.SetMaxIdleConns(readConns)
	if err := r.PingContext(ctx); err != nil {
		return nil, errors.Join(fmt.Errorf("open store %s: read pool: %w", abs, err), r.Close(), w.Close())
	}

	logger.Info("store opened", "path", abs, "schema_version", version)
	return &Store{path: abs, logger: logger, w: w, r: r, metrics: newMetrics(abs)}, nil
}

// Close closes the store's connections, waiting for running queries to
// finish. It is idempotent: later calls return the first call's result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		// The writer closes last so that its close, the last connection's,
		// checkpoints the WAL into the main file.
		if err := errors.Join(s.r.Close(), s.w.Close()); err != nil {
			s.closeErr = fmt.Errorf("close store %s: %w", s.path, err)
		}
	})
	return s.closeErr
}

// prepare checks that the file belongs to this program at a schema version
// it knows, switches it to WAL mode and applies pending migrations. It
// returns the schema version. The checks come first and only read, so a
// refused file is left as it was.
func prepare(ctx context.Context, db *sql.DB, steps []migration, logger *slog.Logger) (int, error) {
	var appID, version, objects int
	if err := db.QueryRowContext(ctx, "PRAGMA application_id").Scan(&appID); err != nil {
		return 0, fmt.Errorf("read application id: %w", err)
	}
	if err := db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM sqlite_schema").Scan(&objects); err != nil {
		return 0, fmt.Errorf("read schema: %w", err)
	}
	empty := appID == 0 && version == 0 && objects == 0
	if appID != applicationID && !empty {
		return 0, fmt.Errorf("%w: application id %#x, schema version %d", ErrNotStore, appID, version)
	}
	if version > len(steps) {
		return 0, fmt.Errorf("%w: file has version %d, this build knows up to %d", ErrSchemaTooNew, version, len(steps))
	}

	var mode string
	if err := db.QueryRowContext(ctx, "PRAGMA journal_mode = WAL").Scan(&mode); err != nil {
		return 0, fmt.Errorf("set journal mode: %w", err)
	}
	if mode != "wal" {
		return 0, fmt.Errorf("set journal mode: got %q, want wal", mode)
	}
	return migrate(ctx, db, steps, logger)
}

// createFile creates the database file with mode 0600 if it does not exist
// and makes its directory entry durable. SQLite would create it with the
// umask's mode, and it fsyncs the directory for its journals, not for the
// main file. An existing file is left to SQLite to check.
func createFile(path string, logger *slog.Logger) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		info, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("stat: %w", err)
		}
		if !info.Mode().IsRegular() {
			return fmt.Errorf("%w: %s is not a regular file", ErrInvalid, path)
		}
		if info.Mode().Perm()&0o077 != 0 {
			logger.Warn("store file is accessible to other users", "path", path, "mode", info.Mode().Perm().String())
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory: %w", err)
	}
	if err := errors.Join(d.Sync(), d.Close()); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// connector opens go-sqlite3 connections with a fixed DSN and an optional
// statement run on every new connection. It avoids the driver registry
// (sql.Open("sqlite3", ...)), which is package-level state.
type connector struct {
	dsn string
	drv *sqlite3.SQLiteDriver
}

// newConnector returns a connector for the file at the absolute path. The
// driver applies params (its _name PRAGMA settings) on every connection,
// then runs onConnect if it is not empty.
func newConnector(path string, params url.Values, onConnect string) connector {
	// A file: URI, so that a path with '?' or '#' is not mistaken for
	// parameters; SQLite ignores the driver's _name parameters.
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + params.Encode()
	drv := &sqlite3.SQLiteDriver{}
	if onConnect != "" {
		drv.ConnectHook = func(c *sqlite3.SQLiteConn) error {
			if _, err := c.Exec(onConnect, nil); err != nil {
				return fmt.Errorf("configure connection: %w", err)
			}
			return nil
		}
	}
	return connector{dsn: dsn, drv: drv}
}

// Connect implements driver.Connector.
func (c connector) Connect(context.Context) (driver.Conn, error) { return c.drv.Open(c.dsn) }

// Driver implements driver.Connector.
func (c connector) Driver() driver.Driver { return c.drv }

// inTx runs fn in a write transaction (BEGIN IMMEDIATE) and commits it if fn
// returns nil; otherwise it rolls back and returns fn's error.
func (s *Store) inTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	return s.txOn(ctx, s.w, fn)
}

// txOn runs fn in a transaction begun on db (the writer pool, or one
// connection of it) and commits it if fn returns nil, timing the commit.
func (s *Store) txOn(ctx context.Context, db interface {
	BeginTx(context.Context, *sql.TxOptions) (*sql.Tx, error)
}, fn func(tx *sql.Tx) error) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	if err := fn(tx); err != nil {
		// The transaction's own error is the one to report; a failed
		// rollback leaves nothing committed either.
		_ = tx.Rollback()
		return err
	}
	start := time.Now()
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	s.metrics.observeCommit(start)
	return nil
}

// Subscribe registers fn to be called, after each committed Apply or
// DeleteByKeyHash, with the keys that batch wrote or removed (in batch
// order; a key may repeat). fn runs on the writer's goroutine after the
// commit, so it must not block or call back into the store's writes: hand
// the keys to a queue and return. A failed batch calls nothing. The
// returned function removes the subscription; it is idempotent.
func (s *Store) Subscribe(fn func(keys []objsync.Key)) (cancel func()) {
	s.subsMu.Lock()
	defer s.subsMu.Unlock()
	if s.subs == nil {
		s.subs = make(map[uint64]func([]objsync.Key))
	}
	s.subSeq++
	id := s.subSeq
	s.subs[id] = fn
	return func() {
		s.subsMu.Lock()
		defer s.subsMu.Unlock()
		delete(s.subs, id)
	}
}

// notify calls the subscribers with keys; see Subscribe.
func (s *Store) notify(keys []objsync.Key) {
	if len(keys) == 0 {
		return
	}
	s.subsMu.Lock()
	fns := make([]func([]objsync.Key), 0, len(s.subs))
	for _, fn := range s.subs {
		fns = append(fns, fn)
	}
	s.subsMu.Unlock()
	for _, fn := range fns {
		fn(keys)
	}
}
