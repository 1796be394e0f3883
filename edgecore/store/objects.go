package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
)

// Object is one Kubernetes object as the edge holds it.
type Object struct {
	// Resource identifies the object. Resource.Version is its API version
	// ("v1"), Resource.UID its uid.
	Resource message.Resource
	// Version is the object's resourceVersion. It is opaque: compare it for
	// equality only.
	Version string
	// Data is the object's JSON.
	Data []byte
}

// Key returns the object's key.
func (o Object) Key() objsync.Key { return objsync.KeyOf(o.Resource) }

// Change is one change of a batch applied by Apply.
type Change struct {
	// Op is message.OpUpsert or message.OpDelete.
	Op message.Op
	// Object is the object to store. A delete needs only the key fields of
	// Object.Resource (group, kind, namespace, name).
	Object Object
}

const upsertObjectSQL = `
INSERT INTO objects (key, key_hash, "group", kind, namespace, name, uid,
	api_version, resource_version, version_hash, data, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
	uid = excluded.uid,
	api_version = excluded.api_version,
	resource_version = excluded.resource_version,
	version_hash = excluded.version_hash,
	data = excluded.data,
	updated_at = excluded.updated_at`

// objectColumns are the columns scanObject reads, in its order.
const objectColumns = `"group", api_version, kind, namespace, name, uid, resource_version, data`

// Apply applies a batch of changes in one transaction: all of them or, on
// any error, none. Changes apply in order; an upsert replaces the stored
// object and a delete of a key that is not stored does nothing, so applying
// a batch twice is harmless. Every change is validated before anything is
// written; an invalid one fails the batch with an error wrapping ErrInvalid
// that names it. When Apply returns nil the batch is durable.
func (s *Store) Apply(ctx context.Context, changes []Change) error {
	for i := range changes {
		c := &changes[i]
		if err := validateChange(c); err != nil {
			return fmt.Errorf("apply batch: change %d (%s): %w", i, describe(c.Op, c.Object.Resource), err)
		}
	}
	if len(changes) == 0 {
		return nil
	}
	now := time.Now().UnixNano()
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		upsert, err := tx.PrepareContext(ctx, upsertObjectSQL)
		if err != nil {
			return fmt.Errorf("prepare upsert: %w", err)
		}
		defer upsert.Close()
		del, err := tx.PrepareContext(ctx, `DELETE FROM objects WHERE key = ?`)
		if err != nil {
			return fmt.Errorf("prepare delete: %w", err)
		}
		defer del.Close()

		for i := range changes {
			c := &changes[i]
			r := c.Object.Resource
			key := c.Object.Key()
			if c.Op == message.OpDelete {
				_, err = del.ExecContext(ctx, key.String())
			} else {
				_, err = upsert.ExecContext(ctx, key.String(), int64(key.Hash()),
					r.Group, r.Kind, r.Namespace, r.Name, r.UID, r.Version,
					c.Object.Version, int64(objsync.VersionHash(r.UID, c.Object.Version)),
					c.Object.Data, now)
			}
			if err != nil {
				return fmt.Errorf("change %d (%s): %w", i, describe(c.Op, r), err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("apply batch: %w", err)
	}
	keys := make([]objsync.Key, len(changes))
	for i := range changes {
		keys[i] = changes[i].Object.Key()
	}
	s.notify(keys)
	return nil
}

// DeleteByKeyHash deletes, in one transaction, every object whose key hash
// is one of hashes, and returns the keys it removed. A hash that matches no
// object is ignored. Should two stored keys share a hash (about 3e-12 for
// 10,000 objects) both are removed; the cloud sends the survivor again.
func (s *Store) DeleteByKeyHash(ctx context.Context, hashes []uint64) ([]objsync.Key, error) {
	if len(hashes) == 0 {
		return nil, nil
	}
	var removed []objsync.Key
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		stmt, err := tx.PrepareContext(ctx,
			`DELETE FROM objects WHERE key_hash = ? RETURNING "group", kind, namespace, name`)
		if err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
		defer stmt.Close()
		for _, h := range hashes {
			keys, err := deleteHash(ctx, stmt, h)
			if err != nil {
				return fmt.Errorf("key hash %#016x: %w", h, err)
			}
			removed = append(removed, keys...)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("delete by key hash: %w", err)
	}
	s.notify(removed)
	return removed, nil
}

func deleteHash(ctx context.Context, stmt *sql.Stmt, h uint64) ([]objsync.Key, error) {
	rows, err := stmt.QueryContext(ctx, int64(h))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var keys []objsync.Key
	for rows.Next() {
		var k objsync.Key
		if err := rows.Scan(&k.Group, &k.Kind, &k.Namespace, &k.Name); err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	return keys, rows.Err()
}

// Get returns the object stored under key; ok is false if there is none.
func (s *Store) Get(ctx context.Context, key objsync.Key) (obj Object, ok bool, err error) {
	row := s.r.QueryRowContext(ctx, `SELECT `+objectColumns+` FROM objects WHERE key = ?`, key.String())
	obj, err = scanObject(row)
	if errors.Is(err, sql.ErrNoRows) {
		return Object{}, false, nil
	}
	if err != nil {
		return Object{}, false, fmt.Errorf("get %q: %w", key.String(), err)
	}
	return obj, true, nil
}

// List returns the objects of a kind in one namespace, or in all namespaces
// (and cluster-scoped ones) if namespace is empty, ordered by namespace,
// name and group. Kinds of different API groups with the same name (core
// and events.k8s.io Event) are listed together; filter on
// Resource.Group if that matters.
func (s *Store) List(ctx context.Context, kind, namespace string) ([]Object, error) {
	if kind == "" {
		return nil, fmt.Errorf("list: %w: kind is empty", ErrInvalid)
	}
	q := `SELECT ` + objectColumns + ` FROM objects WHERE kind = ?`
	args := []any{kind}
	if namespace != "" {
		q += ` AND namespace = ?`
		args = append(args, namespace)
	}
	q += ` ORDER BY namespace, name, "group"`

	rows, err := s.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list %s %q: %w", kind, namespace, err)
	}
	defer rows.Close()
	var out []Object
	for rows.Next() {
		obj, err := scanObject(rows)
		if err != nil {
			return nil, fmt.Errorf("list %s %q: %w", kind, namespace, err)
		}
		out = append(out, obj)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list %s %q: %w", kind, namespace, err)
	}
	return out, nil
}

// Count returns the number of stored objects.
func (s *Store) Count(ctx context.Context) (int, error) {
	var n int
	if err := s.r.QueryRowContext(ctx, `SELECT count(*) FROM objects`).Scan(&n); err != nil {
		return 0, fmt.Errorf("count objects: %w", err)
	}
	return n, nil
}

// Inventory returns every stored object's key hash and version hash,
// ordered by key hash: what the edge holds, for the sync digest. It reads
// only the covering index objects_inventory.
func (s *Store) Inventory(ctx context.Context) ([]objsync.Entry, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT key_hash, version_hash FROM objects ORDER BY key_hash`)
	if err != nil {
		return nil, fmt.Errorf("inventory: %w", err)
	}
	defer rows.Close()
	var out []objsync.Entry
	for rows.Next() {
		var k, v int64
		if err := rows.Scan(&k, &v); err != nil {
			return nil, fmt.Errorf("inventory: %w", err)
		}
		out = append(out, objsync.Entry{Key: uint64(k), Version: uint64(v)})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("inventory: %w", err)
	}
	return out, nil
}

// scanObject reads the objectColumns of one row.
func scanObject(row interface{ Scan(dest ...any) error }) (Object, error) {
	var o Object
	r := &o.Resource
	if err := row.Scan(&r.Group, &r.Version, &r.Kind, &r.Namespace, &r.Name, &r.UID, &o.Version, &o.Data); err != nil {
		return Object{}, err
	}
	return o, nil
}
