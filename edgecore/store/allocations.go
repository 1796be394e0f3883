package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Allocations record what each runtime sandbox holds of the node: dedicated
// cores, hugepage bytes, SR-IOV VFs, disk overlays, a VM's QEMU record. They
// are the edge's memory of who owns what across an EdgeCore restart, so a
// restarted EdgeCore adopts what runs instead of allocating it twice.
//
// Two shapes share the table. An exclusive item (kind "cpu", item "3") can
// be held by one owner only: the primary key (kind, item) makes a second
// claim impossible, whatever the callers do. A counted resource (kind
// "hugepages-2Mi") is one row per owner, its item the owner and its amount
// the bytes; Claim checks the sum of a kind against a limit inside the
// same transaction, so two concurrent claims cannot both fit into what
// only one of them fits.

// ErrTaken is returned by Claim when an exclusive item is held by another
// owner.
var ErrTaken = errors.New("store: allocation held by another owner")

// ErrInsufficient is returned by Claim when a counted kind would exceed its
// limit.
var ErrInsufficient = errors.New("store: not enough left to allocate")

// Bounds of an allocation row.
const (
	MaxAllocationField  = 256
	MaxAllocationDetail = 64 << 10
)

// Allocation is one row: something Owner holds.
type Allocation struct {
	// Owner is the CRI sandbox id holding the item.
	Owner string
	// Kind names the resource ("cpu", "hugepages-2Mi", "vf", "vm").
	Kind string
	// Item is the held thing: a core number, a PCI address, a path; for a
	// counted kind, by convention the owner.
	Item string
	// Amount is the quantity of a counted kind (bytes); 0 for items.
	Amount int64
	// Detail is kind-specific data (JSON by convention), at most
	// MaxAllocationDetail bytes.
	Detail []byte
	// CreatedAt is set by the store when the row is first claimed.
	CreatedAt time.Time
}

// Allocations is the allocation table of a Store. Get it with
// Store.Allocations.
type Allocations struct{ s *Store }

// Allocations returns the store's allocation table.
func (s *Store) Allocations() Allocations { return Allocations{s: s} }

// Claim records rows for owner in one transaction: either all of them or,
// on any error, none. A row whose (kind, item) owner already holds is
// replaced (its amount and detail updated, its creation time kept), so a
// claim can be repeated after a crash. limits bounds counted kinds: after
// the rows are written, the sum of Amount over every owner of each kind in
// limits must not exceed its limit, else ErrInsufficient. A (kind, item)
// held by another owner is ErrTaken.
func (a Allocations) Claim(ctx context.Context, owner string, rows []Allocation, limits map[string]int64) error {
	if err := checkAllocationField("owner", owner); err != nil {
		return fmt.Errorf("claim for %q: %w", owner, err)
	}
	for _, r := range rows {
		if err := checkAllocation(owner, r); err != nil {
			return fmt.Errorf("claim for %q: %w", owner, err)
		}
	}
	now := time.Now().UnixNano()
	err := a.s.inTx(ctx, func(tx *sql.Tx) error {
		for _, r := range rows {
			var holder string
			err := tx.QueryRowContext(ctx, `SELECT owner FROM allocations WHERE kind = ? AND item = ?`, r.Kind, r.Item).Scan(&holder)
			switch {
			case errors.Is(err, sql.ErrNoRows):
			case err != nil:
				return err
			case holder != owner:
				return fmt.Errorf("%w: %s %q is held by %q", ErrTaken, r.Kind, r.Item, holder)
			}
			_, err = tx.ExecContext(ctx, `INSERT INTO allocations (kind, item, owner, amount, detail, created_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (kind, item) DO UPDATE SET amount = excluded.amount, detail = excluded.detail`,
				r.Kind, r.Item, owner, r.Amount, detailBytes(r.Detail), now)
			if err != nil {
				return err
			}
		}
		kinds := make([]string, 0, len(limits))
		for k := range limits {
			kinds = append(kinds, k)
		}
		slices.Sort(kinds)
		for _, k := range kinds {
			var sum int64
			if err := tx.QueryRowContext(ctx, `SELECT COALESCE(SUM(amount), 0) FROM allocations WHERE kind = ?`, k).Scan(&sum); err != nil {
				return err
			}
			if sum > limits[k] {
				return fmt.Errorf("%w: %s would be %d of %d", ErrInsufficient, k, sum, limits[k])
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("claim for %q: %w", owner, err)
	}
	return nil
}

// detailBytes keeps the NOT NULL column satisfied for an empty detail.
func detailBytes(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

func checkAllocation(owner string, r Allocation) error {
	if r.Owner != "" && r.Owner != owner {
		return fmt.Errorf("%w: row of owner %q in a claim for %q", ErrInvalid, r.Owner, owner)
	}
	for _, f := range []struct{ name, v string }{{"kind", r.Kind}, {"item", r.Item}} {
		if err := checkAllocationField(f.name, f.v); err != nil {
			return err
		}
	}
	if r.Amount < 0 {
		return fmt.Errorf("%w: negative amount %d of %s", ErrInvalid, r.Amount, r.Kind)
	}
	if len(r.Detail) > MaxAllocationDetail {
		return fmt.Errorf("%w: detail of %s %q is %d bytes, limit %d", ErrInvalid, r.Kind, r.Item, len(r.Detail), MaxAllocationDetail)
	}
	return nil
}

func checkAllocationField(name, v string) error {
	if len(v) > MaxAllocationField {
		return fmt.Errorf("%w: %s is %d bytes, limit %d", ErrInvalid, name, len(v), MaxAllocationField)
	}
	return checkRuntimeField(name, v)
}

// Release removes every row of owner. Releasing an owner that holds
// nothing is not an error.
func (a Allocations) Release(ctx context.Context, owner string) error {
	err := a.s.inTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `DELETE FROM allocations WHERE owner = ?`, owner)
		return err
	})
	if err != nil {
		return fmt.Errorf("release %q: %w", owner, err)
	}
	return nil
}

// ReleaseKinds removes the rows of owner whose kind is one of kinds, in
// one transaction, and leaves its other rows: the resource pool gives back
// what it granted without dropping the VM record of the same sandbox.
// Releasing kinds the owner does not hold is not an error.
func (a Allocations) ReleaseKinds(ctx context.Context, owner string, kinds ...string) error {
	err := a.s.inTx(ctx, func(tx *sql.Tx) error {
		for _, k := range kinds {
			if _, err := tx.ExecContext(ctx, `DELETE FROM allocations WHERE owner = ? AND kind = ?`, owner, k); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("release %v of %q: %w", kinds, owner, err)
	}
	return nil
}

// Owner returns the rows of owner, in (kind, item) order.
func (a Allocations) Owner(ctx context.Context, owner string) ([]Allocation, error) {
	return a.query(ctx, `WHERE owner = ? ORDER BY kind, item`, owner)
}

// Kind returns every owner's rows of kind, in item order; kind "" returns
// every row, in (kind, item) order.
func (a Allocations) Kind(ctx context.Context, kind string) ([]Allocation, error) {
	if kind == "" {
		return a.query(ctx, `ORDER BY kind, item`)
	}
	return a.query(ctx, `WHERE kind = ? ORDER BY item`, kind)
}

func (a Allocations) query(ctx context.Context, where string, args ...any) ([]Allocation, error) {
	rows, err := a.s.r.QueryContext(ctx, `SELECT kind, item, owner, amount, detail, created_at FROM allocations `+where, args...)
	if err != nil {
		return nil, fmt.Errorf("list allocations: %w", err)
	}
	defer rows.Close()
	var out []Allocation
	for rows.Next() {
		var r Allocation
		var created int64
		if err := rows.Scan(&r.Kind, &r.Item, &r.Owner, &r.Amount, &r.Detail, &created); err != nil {
			return nil, fmt.Errorf("list allocations: %w", err)
		}
		r.CreatedAt = time.Unix(0, created)
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list allocations: %w", err)
	}
	return out, nil
}
