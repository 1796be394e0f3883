package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"
)

// The runtime id map records which backend of EdgeCore's CRI shim owns
// each pod sandbox and container. The CRI names the runtime handler only in
// RunPodSandbox; every later call names an id alone, so the shim records
// the backend under the id the backend returned and routes by it, also
// after EdgeCore restarts. A container row also names its sandbox, and
// deleting a sandbox deletes its containers' rows.
//
// Durability: the rows are committed with synchronous=NORMAL, not FULL as
// every other write of the store. In WAL mode a NORMAL commit is in the
// WAL, in the page cache, when it returns: it survives kill -9 of EdgeCore
// (the restart guarantee the shim needs), but not a power loss until the
// next FULL commit of the store (any object, outbox or lease write), whose
// fsync of the WAL covers it. It saves the shim one fsync in RunPodSandbox
// and CreateContainer (0.6-1.5 ms of the shim's 1.1-1.9 ms, see
// docs/benchmarks.md). After a power loss the pods' processes are gone
// too, and an id the map lost routes to the default backend, which is
// right for every sandbox and container of containerd.

// RuntimeKind says what a runtime id names.
type RuntimeKind int

// Runtime id kinds, as stored.
const (
	RuntimeSandbox   RuntimeKind = 1
	RuntimeContainer RuntimeKind = 2
)

// MaxRuntimeIDLen bounds ids and backend names (containerd's ids are 64
// hex digits).
const MaxRuntimeIDLen = 256

// RuntimeID is one row of the runtime id map.
type RuntimeID struct {
	ID      string
	Kind    RuntimeKind
	Backend string
	// SandboxID is a container's sandbox; for a sandbox, its own id.
	SandboxID string
	CreatedAt time.Time
}

// RuntimeIDs is the runtime id map of a Store. Get it with Store.RuntimeIDs.
type RuntimeIDs struct{ s *Store }

// RuntimeIDs returns the store's runtime id map.
func (s *Store) RuntimeIDs() RuntimeIDs { return RuntimeIDs{s: s} }

// PutSandbox records that backend owns the sandbox id. Recording an id
// again replaces its row.
func (m RuntimeIDs) PutSandbox(ctx context.Context, id, backend string) error {
	return m.put(ctx, RuntimeID{ID: id, Kind: RuntimeSandbox, Backend: backend, SandboxID: id})
}

// PutContainer records that the container id lives in sandboxID on backend.
func (m RuntimeIDs) PutContainer(ctx context.Context, id, sandboxID, backend string) error {
	return m.put(ctx, RuntimeID{ID: id, Kind: RuntimeContainer, Backend: backend, SandboxID: sandboxID})
}

func (m RuntimeIDs) put(ctx context.Context, r RuntimeID) error {
	for _, f := range []struct{ name, v string }{{"id", r.ID}, {"backend", r.Backend}, {"sandbox id", r.SandboxID}} {
		if err := checkRuntimeField(f.name, f.v); err != nil {
			return fmt.Errorf("put runtime id %q: %w", r.ID, err)
		}
	}
	err := m.s.inTxNormal(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO runtime_ids (id, kind, backend, sandbox_id, created_at)
VALUES (?, ?, ?, ?, ?)`, r.ID, int(r.Kind), r.Backend, r.SandboxID, time.Now().UnixNano())
		return err
	})
	if err != nil {
		return fmt.Errorf("put runtime id %q: %w", r.ID, err)
	}
	return nil
}

func checkRuntimeField(name, v string) error {
	switch {
	case v == "":
		return fmt.Errorf("%w: empty %s", ErrInvalid, name)
	case len(v) > MaxRuntimeIDLen:
		return fmt.Errorf("%w: %s is %d bytes, limit %d", ErrInvalid, name, len(v), MaxRuntimeIDLen)
	case !utf8.ValidString(v):
		return fmt.Errorf("%w: %s is not UTF-8", ErrInvalid, name)
	}
	return nil
}

// Lookup returns the row of id; ok is false if the id is not recorded.
func (m RuntimeIDs) Lookup(ctx context.Context, id string) (r RuntimeID, ok bool, err error) {
	var kind int
	var created int64
	err = m.s.r.QueryRowContext(ctx, `SELECT id, kind, backend, sandbox_id, created_at FROM runtime_ids WHERE id = ?`, id).
		Scan(&r.ID, &kind, &r.Backend, &r.SandboxID, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return RuntimeID{}, false, nil
	}
	if err != nil {
		return RuntimeID{}, false, fmt.Errorf("look up runtime id %q: %w", id, err)
	}
	r.Kind, r.CreatedAt = RuntimeKind(kind), time.Unix(0, created)
	return r, true, nil
}

// Delete removes id; for a sandbox, also its containers. Deleting an id
// that is not recorded is not an error.
func (m RuntimeIDs) Delete(ctx context.Context, id string) error {
	err := m.s.inTxNormal(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `DELETE FROM runtime_ids WHERE id = ?1
OR (sandbox_id = ?1 AND kind = ?2)`, id, int(RuntimeContainer))
		return err
	})
	if err != nil {
		return fmt.Errorf("delete runtime id %q: %w", id, err)
	}
	return nil
}

// List returns every row, sandboxes first, then in id order.
func (m RuntimeIDs) List(ctx context.Context) ([]RuntimeID, error) {
	rows, err := m.s.r.QueryContext(ctx, `SELECT id, kind, backend, sandbox_id, created_at FROM runtime_ids ORDER BY kind, id`)
	if err != nil {
		return nil, fmt.Errorf("list runtime ids: %w", err)
	}
	defer rows.Close()
	var out []RuntimeID
	for rows.Next() {
		var r RuntimeID
		var kind int
		var created int64
		if err := rows.Scan(&r.ID, &kind, &r.Backend, &r.SandboxID, &created); err != nil {
			return nil, fmt.Errorf("list runtime ids: %w", err)
		}
		r.Kind, r.CreatedAt = RuntimeKind(kind), time.Unix(0, created)
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list runtime ids: %w", err)
	}
	return out, nil
}

// inTxNormal is inTx with synchronous=NORMAL for this one transaction (see
// Durability above). The writer connection is set back to FULL before it
// goes back to the pool; if that fails, the connection is discarded, so no
// other write ever commits with NORMAL.
func (s *Store) inTxNormal(ctx context.Context, fn func(tx *sql.Tx) error) (err error) {
	conn, err := s.w.Conn(ctx)
	if err != nil {
		return fmt.Errorf("take writer: %w", err)
	}
	defer func() {
		_, rerr := conn.ExecContext(context.WithoutCancel(ctx), "PRAGMA synchronous = FULL")
		if rerr != nil {
			err = errors.Join(err, fmt.Errorf("restore synchronous=FULL: %w", rerr))
			_ = conn.Raw(func(any) error { return driver.ErrBadConn }) // drop the connection
		}
		err = errors.Join(err, conn.Close())
	}()
	if _, err := conn.ExecContext(ctx, "PRAGMA synchronous = NORMAL"); err != nil {
		return fmt.Errorf("set synchronous=NORMAL: %w", err)
	}
	return s.txOn(ctx, conn, fn)
}
