package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// The tunnel client's TLS session tickets are kept in the tls_tickets table
// (schema step 4), so that EdgeCore resumes its TLS session after a restart
// instead of exchanging certificates again. The store treats them as
// opaque bytes; the tunnel checks what it reads back. A ticket's data holds
// the session's resumption secret: whoever has it can resume the node's
// session until the ticket expires, so it gets the care of the node's key
// (the database file is created 0600, in the 0700 data directory).

// maxTicketBytes bounds one stored ticket: a ticket with its session state
// is a few kB (it carries the certificates); anything far larger is not one.
const maxTicketBytes = 64 << 10

// LoadTicket returns the ticket saved under key, or nil when there is none.
func (s *Store) LoadTicket(ctx context.Context, key string) ([]byte, error) {
	var data []byte
	err := s.r.QueryRowContext(ctx, `SELECT data FROM tls_tickets WHERE key = ?`, key).Scan(&data)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("load session ticket %q: %w", key, err)
	}
	return data, nil
}

// SaveTicket saves data under key, replacing what was there; nil data
// removes it. An empty key or data over 64 KiB is refused with ErrInvalid
// and nothing is written.
func (s *Store) SaveTicket(ctx context.Context, key string, data []byte) error {
	if key == "" || len(data) > maxTicketBytes {
		return fmt.Errorf("save session ticket: %w: key %q, %d bytes", ErrInvalid, key, len(data))
	}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if data == nil {
			_, err := tx.ExecContext(ctx, `DELETE FROM tls_tickets WHERE key = ?`, key)
			return err
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO tls_tickets (key, data, saved_at) VALUES (?, ?, ?)
ON CONFLICT (key) DO UPDATE SET data = excluded.data, saved_at = excluded.saved_at`, key, data, time.Now().UnixNano())
		return err
	})
	if err != nil {
		return fmt.Errorf("save session ticket %q: %w", key, err)
	}
	return nil
}
