package store

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
)

// migration is one step of the schema. Step n (1-based) takes the file from
// schema version n-1 to n; the version is PRAGMA user_version, which is part
// of the SQLite header and changes in the same transaction as the step.
// Steps are only ever appended: a released step is never edited.
type migration struct {
	version int
	name    string
	sql     string
}

// migrations returns the schema, oldest step first. It is a function, not
// a package variable, so that no code can change the schema at run time.
func migrations() []migration {
	return []migration{
		{version: 1, name: "objects, outbox and meta", sql: `
CREATE TABLE objects (
	key              TEXT    NOT NULL PRIMARY KEY, -- objsync.Key.String()
	key_hash         INTEGER NOT NULL,             -- int64(objsync.Key.Hash())
	"group"          TEXT    NOT NULL,
	kind             TEXT    NOT NULL,
	namespace        TEXT    NOT NULL,
	name             TEXT    NOT NULL,
	uid              TEXT    NOT NULL,
	api_version      TEXT    NOT NULL,             -- message.Resource.Version
	resource_version TEXT    NOT NULL,             -- opaque
	version_hash     INTEGER NOT NULL,             -- int64(objsync.VersionHash(uid, resource_version))
	data             BLOB    NOT NULL,             -- the object's JSON
	updated_at       INTEGER NOT NULL              -- Unix nanoseconds
) STRICT;

-- Lookup by key hash (prune) and the inventory, which it covers.
CREATE INDEX objects_inventory ON objects (key_hash, version_hash);
-- List by kind and namespace, in namespace/name order.
CREATE INDEX objects_by_kind ON objects (kind, namespace, name);

CREATE TABLE outbox (
	key         TEXT    NOT NULL PRIMARY KEY,      -- objsync.Key.String()
	seq         INTEGER NOT NULL UNIQUE,           -- from meta.outbox_seq
	op          INTEGER NOT NULL,                  -- message.Op
	"group"     TEXT    NOT NULL,
	api_version TEXT    NOT NULL,
	kind        TEXT    NOT NULL,
	namespace   TEXT    NOT NULL,
	name        TEXT    NOT NULL,
	uid         TEXT    NOT NULL,
	data        BLOB    NOT NULL,
	created_at  INTEGER NOT NULL                   -- Unix ns; when the key became pending
) STRICT;

CREATE TABLE meta (
	name  TEXT    NOT NULL PRIMARY KEY,
	value INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- The last outbox sequence number handed out. It only grows, so a seq is
-- never reused even after the item that had it is acknowledged.
INSERT INTO meta (name, value) VALUES ('outbox_seq', 0);

PRAGMA application_id = 1413829704; -- applicationID, "TETH"
`},
		{version: 2, name: "runtime id map", sql: `
-- Which CRI shim backend owns each sandbox and container (runtimeids.go).
-- Only RunPodSandbox names a runtime handler; every later call names an id,
-- and this table routes it, also after a restart.
CREATE TABLE runtime_ids (
	id         TEXT    NOT NULL PRIMARY KEY, -- the CRI sandbox or container id
	kind       INTEGER NOT NULL,             -- RuntimeKind: 1 sandbox, 2 container
	backend    TEXT    NOT NULL,             -- the shim's backend name
	sandbox_id TEXT    NOT NULL,             -- a container's sandbox; a sandbox's own id
	created_at INTEGER NOT NULL              -- Unix nanoseconds
) STRICT;

-- A sandbox's containers, removed with it.
CREATE INDEX runtime_ids_by_sandbox ON runtime_ids (sandbox_id);
`},
		{version: 3, name: "runtime allocations", sql: `
-- What each sandbox holds of the node (allocations.go): exclusive items
-- (a core, a VF, an overlay path) are unique per (kind, item), so two
-- owners can never hold the same one; counted resources (hugepage bytes)
-- are one row per owner with an amount, summed against a limit in the
-- claiming transaction. An owner's rows are claimed and released together.
CREATE TABLE allocations (
	kind       TEXT    NOT NULL, -- "cpu", "hugepages-2Mi", "vf", "vm", ...
	item       TEXT    NOT NULL, -- the core, PCI address, path; the owner for counted kinds
	owner      TEXT    NOT NULL, -- the CRI sandbox id holding it
	amount     INTEGER NOT NULL, -- for counted kinds; 0 otherwise
	detail     BLOB    NOT NULL, -- kind-specific JSON, may be empty
	created_at INTEGER NOT NULL, -- Unix nanoseconds
	PRIMARY KEY (kind, item)
) STRICT;

CREATE INDEX allocations_by_owner ON allocations (owner);
`},
		{version: 4, name: "tls session tickets", sql: `
-- The tunnel's TLS session tickets (tickets.go), one per transport and
-- server name, so that the first connection after a restart resumes.
-- data holds a resumption secret: as sensitive as the node's private key
-- until the ticket expires (the file is 0600 in a 0700 directory).
CREATE TABLE tls_tickets (
	key      TEXT    NOT NULL PRIMARY KEY, -- "quic/<server name>", "websocket/<server name>"
	data     BLOB    NOT NULL,             -- opaque to the store (tunnel/resume.go)
	saved_at INTEGER NOT NULL              -- Unix nanoseconds
) STRICT, WITHOUT ROWID;
`},
		{version: 5, name: "pod service-account tokens", sql: `
-- The service-account tokens of the pods' serviceAccountToken projections
-- (podtokens.go), so that a pod (re)started while the cloud is unreachable
-- gets the token it had. token is a secret: as sensitive as a Secret's
-- data (the file is 0600 in a 0700 directory); never logged.
CREATE TABLE pod_tokens (
	pod_uid    TEXT    NOT NULL, -- the pod the token is bound to
	key        TEXT    NOT NULL, -- the projection: "<volume>/<path>"
	request    TEXT    NOT NULL, -- what was asked (service account, audiences, lifetime)
	token      TEXT    NOT NULL, -- the JWT
	issued_at  INTEGER NOT NULL, -- Unix nanoseconds
	expires_at INTEGER NOT NULL, -- Unix nanoseconds
	PRIMARY KEY (pod_uid, key)
) STRICT, WITHOUT ROWID;
`},
	}
}

// migrate applies the steps the file does not have yet, each in its own
// transaction, and returns the resulting schema version.
func migrate(ctx context.Context, db *sql.DB, steps []migration, logger *slog.Logger) (int, error) {
	for i, m := range steps {
		if m.version != i+1 {
			return 0, fmt.Errorf("migration %d %q has version %d", i+1, m.name, m.version)
		}
	}
	version := 0
	for _, m := range steps {
		applied, from, err := migrateStep(ctx, db, m, len(steps))
		if err != nil {
			return 0, fmt.Errorf("migrate to schema version %d (%s): %w", m.version, m.name, err)
		}
		if applied {
			logger.Info("schema migrated", "from_version", from, "to_version", m.version, "step", m.name)
		}
		version = max(from, m.version)
	}
	return version, nil
}

// migrateStep applies one step if the file's version is just below it. It
// reads the version inside the write transaction, so a concurrent opener
// cannot apply the same step twice.
func migrateStep(ctx context.Context, db *sql.DB, m migration, latest int) (applied bool, from int, err error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return false, 0, fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if !applied {
			_ = tx.Rollback() // nothing was written, or the error is reported
		}
	}()
	if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&from); err != nil {
		return false, 0, fmt.Errorf("read schema version: %w", err)
	}
	switch {
	case from > latest:
		return false, from, fmt.Errorf("%w: file has version %d, this build knows up to %d", ErrSchemaTooNew, from, latest)
	case from >= m.version:
		return false, from, nil
	case from != m.version-1:
		return false, from, fmt.Errorf("file has version %d, step needs %d", from, m.version-1)
	}
	if _, err := tx.ExecContext(ctx, m.sql); err != nil {
		return false, from, fmt.Errorf("apply: %w", err)
	}
	// PRAGMA takes no bound parameters; the version is an int we control.
	if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", m.version)); err != nil {
		return false, from, fmt.Errorf("set version: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return false, from, fmt.Errorf("commit: %w", err)
	}
	return true, from, nil
}
