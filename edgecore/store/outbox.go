package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
)

// The outbox holds writes the edge owes the cloud (node status, lease, pod
// status) until the cloud acknowledges them, across disconnects and
// restarts. It keeps at most one item per object key: a newer item for a key
// replaces the older one, which is never sent, so a node that was offline
// for an hour sends its latest status once, not sixty times. Items are
// therefore complete on their own: enqueue the whole status each time, not
// a delta of the previous item.
//
// Each item gets a sequence number that only grows, also across
// replacements and acknowledgements. The sender sends Pending items in seq
// order and calls Done(key, seq) on the cloud's ack; Done removes the item
// only if it still has that seq, so the ack of a replaced item does not
// remove its replacement.

// OutboxItem is a write the edge asks the cloud to make on its behalf.
type OutboxItem struct {
	// Seq orders items. Enqueue assigns it and ignores the caller's value.
	Seq uint64
	// Op is message.OpUpsert, message.OpStatus or message.OpDelete.
	Op message.Op
	// Resource identifies the object; kind and name are required.
	Resource message.Resource
	// Data is the payload, opaque to the store; required except for a
	// delete.
	Data []byte
}

// Key returns the key of the item's object.
func (it OutboxItem) Key() objsync.Key { return objsync.KeyOf(it.Resource) }

func validateOutboxItem(it *OutboxItem) error {
	switch it.Op {
	case message.OpUpsert, message.OpStatus, message.OpDelete:
	default:
		return fmt.Errorf("%w: op %s (%d), want upsert, status or delete", ErrInvalid, it.Op, uint8(it.Op))
	}
	if err := validateResource(it.Resource); err != nil {
		return err
	}
	if it.Op == message.OpDelete {
		if len(it.Data) > MaxDataLen {
			return fmt.Errorf("%w: data is %d bytes, limit %d", ErrInvalid, len(it.Data), MaxDataLen)
		}
		return nil
	}
	return checkData(it.Data)
}

// Enqueue stores item durably, replacing any pending item for the same key,
// and returns its sequence number, greater than any handed out before.
func (s *Store) Enqueue(ctx context.Context, item OutboxItem) (uint64, error) {
	if err := validateOutboxItem(&item); err != nil {
		return 0, fmt.Errorf("enqueue %s: %w", describe(item.Op, item.Resource), err)
	}
	data := item.Data
	if data == nil {
		data = []byte{} // the column is NOT NULL; a nil slice binds as NULL
	}
	r := item.Resource
	key := item.Key().String()
	var seq int64
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		err := tx.QueryRowContext(ctx,
			`UPDATE meta SET value = value + 1 WHERE name = 'outbox_seq' RETURNING value`).Scan(&seq)
		if err != nil {
			return fmt.Errorf("next seq: %w", err)
		}
		_, err = tx.ExecContext(ctx, `
INSERT INTO outbox (key, seq, op, "group", api_version, kind, namespace, name, uid, data, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
	seq = excluded.seq,
	op = excluded.op,
	api_version = excluded.api_version,
	uid = excluded.uid,
	data = excluded.data`,
			key, seq, int64(item.Op), r.Group, r.Version, r.Kind, r.Namespace, r.Name, r.UID,
			data, time.Now().UnixNano())
		if err != nil {
			return fmt.Errorf("insert: %w", err)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("enqueue %s: %w", describe(item.Op, r), err)
	}
	return uint64(seq), nil
}

// Pending returns up to limit (> 0) pending items, oldest seq first.
func (s *Store) Pending(ctx context.Context, limit int) ([]OutboxItem, error) {
	if limit <= 0 {
		return nil, fmt.Errorf("pending: %w: limit %d", ErrInvalid, limit)
	}
	rows, err := s.r.QueryContext(ctx, `
SELECT seq, op, "group", api_version, kind, namespace, name, uid, data
FROM outbox ORDER BY seq LIMIT ?`, limit)
	if err != nil {
		return nil, fmt.Errorf("pending: %w", err)
	}
	defer rows.Close()
	var out []OutboxItem
	for rows.Next() {
		var (
			it       OutboxItem
			seq, op  int64
			resource = &it.Resource
		)
		err := rows.Scan(&seq, &op, &resource.Group, &resource.Version, &resource.Kind,
			&resource.Namespace, &resource.Name, &resource.UID, &it.Data)
		if err != nil {
			return nil, fmt.Errorf("pending: %w", err)
		}
		if op < 0 || op > 255 {
			return nil, fmt.Errorf("pending: seq %d: stored op %d out of range", seq, op)
		}
		it.Seq, it.Op = uint64(seq), message.Op(op)
		out = append(out, it)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("pending: %w", err)
	}
	return out, nil
}

// Done removes the item for key if its seq is still seq: the cloud has
// acknowledged it. If the item was replaced since (its seq is newer) or is
// already gone, Done does nothing.
func (s *Store) Done(ctx context.Context, key objsync.Key, seq uint64) error {
	if seq > 1<<63-1 {
		return nil // never handed out
	}
	_, err := s.w.ExecContext(ctx, `DELETE FROM outbox WHERE key = ? AND seq = ?`, key.String(), int64(seq))
	if err != nil {
		return fmt.Errorf("outbox done %q seq %d: %w", key.String(), seq, err)
	}
	return nil
}

// PendingCount returns the number of pending outbox items.
func (s *Store) PendingCount(ctx context.Context) (int, error) {
	var n int
	if err := s.r.QueryRowContext(ctx, `SELECT count(*) FROM outbox`).Scan(&n); err != nil {
		return 0, fmt.Errorf("count outbox: %w", err)
	}
	return n, nil
}
