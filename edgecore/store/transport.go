package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// The tunnel transport that last reached the cloud is kept in the meta
// table (name 'last_transport'), so that EdgeCore starts with it after a
// restart: where UDP is blocked it does not try QUIC first every time.
// The row is absent until the first session.

// Transport is a tunnel transport as stored.
type Transport int64

// Stored transports.
const (
	TransportUnknown   Transport = 0 // nothing recorded, or a value this build does not know
	TransportQUIC      Transport = 1
	TransportWebSocket Transport = 2
)

// LastTransport returns the transport recorded by SetLastTransport, or
// TransportUnknown when none is (a value written by a newer build reads
// as TransportUnknown too).
func (s *Store) LastTransport(ctx context.Context) (Transport, error) {
	var v int64
	err := s.r.QueryRowContext(ctx, `SELECT value FROM meta WHERE name = 'last_transport'`).Scan(&v)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return TransportUnknown, nil
	case err != nil:
		return TransportUnknown, fmt.Errorf("read last transport: %w", err)
	}
	if t := Transport(v); t == TransportQUIC || t == TransportWebSocket {
		return t, nil
	}
	return TransportUnknown, nil
}

// SetLastTransport records t, TransportQUIC or TransportWebSocket; any
// other value is refused with ErrInvalid and nothing is written.
func (s *Store) SetLastTransport(ctx context.Context, t Transport) error {
	if t != TransportQUIC && t != TransportWebSocket {
		return fmt.Errorf("set last transport: %w: transport %d", ErrInvalid, t)
	}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO meta (name, value) VALUES ('last_transport', ?)
ON CONFLICT (name) DO UPDATE SET value = excluded.value`, int64(t))
		return err
	})
	if err != nil {
		return fmt.Errorf("set last transport: %w", err)
	}
	return nil
}
