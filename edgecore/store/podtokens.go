package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// The service-account tokens of the pods' serviceAccountToken projections
// are kept in the pod_tokens table (schema step 5), one per pod UID and
// projection, so that a pod started while the cloud is unreachable (after
// an EdgeCore restart, a containerd restart, a reboot) gets its token
// while it is valid. A token is a secret: the store never logs one, and
// its errors never carry one.

// PodToken is one stored token.
type PodToken struct {
	// PodUID and Key identify it: the pod and its projection
	// ("<volume>/<path>").
	PodUID, Key string
	// Request says what was asked (service account, audiences, lifetime),
	// so that a changed projection is not served an old token. Opaque to
	// the store.
	Request string
	// Token is the token itself.
	Token string
	// IssuedAt and ExpiresAt bound its validity.
	IssuedAt, ExpiresAt time.Time
}

// maxTokenBytes bounds one stored token (message's own bound).
const maxTokenBytes = 16 << 10

// String hides the token.
func (t PodToken) String() string {
	return fmt.Sprintf("pod token %s %s (%d bytes, expires %s)", t.PodUID, t.Key, len(t.Token), t.ExpiresAt.UTC().Format(time.RFC3339))
}

// PodToken returns the token stored for podUID and key, and whether there
// is one.
func (s *Store) PodToken(ctx context.Context, podUID, key string) (PodToken, bool, error) {
	t := PodToken{PodUID: podUID, Key: key}
	var issued, expires int64
	err := s.r.QueryRowContext(ctx, `SELECT request, token, issued_at, expires_at FROM pod_tokens WHERE pod_uid = ? AND key = ?`,
		podUID, key).Scan(&t.Request, &t.Token, &issued, &expires)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return PodToken{}, false, nil
	case err != nil:
		return PodToken{}, false, fmt.Errorf("read pod token %s %s: %w", podUID, key, err)
	}
	t.IssuedAt, t.ExpiresAt = time.Unix(0, issued), time.Unix(0, expires)
	return t, true, nil
}

// SavePodToken stores t, replacing the token of the same pod and key. A
// token without pod UID, key or token, over 16 KiB, or expiring before it
// was issued is refused with ErrInvalid and nothing is written.
func (s *Store) SavePodToken(ctx context.Context, t PodToken) error {
	if t.PodUID == "" || t.Key == "" || t.Token == "" || len(t.Token) > maxTokenBytes || !t.ExpiresAt.After(t.IssuedAt) {
		return fmt.Errorf("save pod token %s %s: %w: %d bytes, issued %s, expires %s", t.PodUID, t.Key, ErrInvalid,
			len(t.Token), t.IssuedAt.UTC().Format(time.RFC3339), t.ExpiresAt.UTC().Format(time.RFC3339))
	}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO pod_tokens (pod_uid, key, request, token, issued_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (pod_uid, key) DO UPDATE SET request = excluded.request, token = excluded.token,
	issued_at = excluded.issued_at, expires_at = excluded.expires_at`,
			t.PodUID, t.Key, t.Request, t.Token, t.IssuedAt.UnixNano(), t.ExpiresAt.UnixNano())
		return err
	})
	if err != nil {
		return fmt.Errorf("save pod token %s %s: %w", t.PodUID, t.Key, err)
	}
	return nil
}

// DeletePodTokens removes every token of podUID.
func (s *Store) DeletePodTokens(ctx context.Context, podUID string) error {
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `DELETE FROM pod_tokens WHERE pod_uid = ?`, podUID)
		return err
	})
	if err != nil {
		return fmt.Errorf("delete pod tokens of %s: %w", podUID, err)
	}
	return nil
}

// PodTokenUIDs returns the pod UIDs that have stored tokens, so that the
// tokens of pods gone while EdgeCore was not looking can be removed.
func (s *Store) PodTokenUIDs(ctx context.Context) ([]string, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT DISTINCT pod_uid FROM pod_tokens ORDER BY pod_uid`)
	if err != nil {
		return nil, fmt.Errorf("list pod tokens: %w", err)
	}
	defer rows.Close()
	var uids []string
	for rows.Next() {
		var uid string
		if err := rows.Scan(&uid); err != nil {
			return nil, fmt.Errorf("list pod tokens: %w", err)
		}
		uids = append(uids, uid)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list pod tokens: %w", err)
	}
	return uids, nil
}
