package store

import (
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestAllocationsSurviveReopen(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "edge.db")
	s := openStore(t, path)
	a := s.Allocations()
	require.NoError(t, a.Claim(ctx, "sb1", []Allocation{
		{Kind: "cpu", Item: "2"},
		{Kind: "cpu", Item: "3"},
		{Kind: "hugepages-2Mi", Item: "sb1", Amount: 512 << 20},
		{Kind: "vm", Item: "sb1", Detail: []byte(`{"pid":42}`)},
	}, map[string]int64{"hugepages-2Mi": 1 << 30}))
	require.NoError(t, s.Close())

	s = openStore(t, path)
	a = s.Allocations()
	got, err := a.Owner(ctx, "sb1")
	require.NoError(t, err)
	require.Len(t, got, 4)
	require.Equal(t, "cpu", got[0].Kind)
	require.Equal(t, "2", got[0].Item)
	require.Equal(t, "sb1", got[0].Owner)
	require.False(t, got[0].CreatedAt.IsZero())
	require.Equal(t, int64(512<<20), got[2].Amount)
	require.JSONEq(t, `{"pid":42}`, string(got[3].Detail))
	cpus, err := a.Kind(ctx, "cpu")
	require.NoError(t, err)
	require.Len(t, cpus, 2)
	all, err := a.Kind(ctx, "")
	require.NoError(t, err)
	require.Len(t, all, 4)
}

func TestAllocationsClaimIsAllOrNothing(t *testing.T) {
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	a := s.Allocations()
	require.NoError(t, a.Claim(ctx, "sb1", []Allocation{{Kind: "vf", Item: "0000:3b:02.1"}}, nil))

	// sb2 asks for a free core and the VF sb1 holds: it gets neither.
	err := a.Claim(ctx, "sb2", []Allocation{{Kind: "cpu", Item: "1"}, {Kind: "vf", Item: "0000:3b:02.1"}}, nil)
	require.ErrorIs(t, err, ErrTaken)
	require.ErrorContains(t, err, `held by "sb1"`)
	got, err := a.Owner(ctx, "sb2")
	require.NoError(t, err)
	require.Empty(t, got)

	// Over a limit: nothing is written either.
	require.NoError(t, a.Claim(ctx, "sb1", []Allocation{{Kind: "hugepages-2Mi", Item: "sb1", Amount: 600}}, map[string]int64{"hugepages-2Mi": 1000}))
	err = a.Claim(ctx, "sb2", []Allocation{{Kind: "cpu", Item: "1"}, {Kind: "hugepages-2Mi", Item: "sb2", Amount: 500}}, map[string]int64{"hugepages-2Mi": 1000})
	require.ErrorIs(t, err, ErrInsufficient)
	require.ErrorContains(t, err, "hugepages-2Mi would be 1100 of 1000")
	got, err = a.Owner(ctx, "sb2")
	require.NoError(t, err)
	require.Empty(t, got)

	// The same owner claiming again replaces its rows (after a crash).
	require.NoError(t, a.Claim(ctx, "sb1", []Allocation{{Kind: "hugepages-2Mi", Item: "sb1", Amount: 900}}, map[string]int64{"hugepages-2Mi": 1000}))
	got, err = a.Owner(ctx, "sb1")
	require.NoError(t, err)
	require.Len(t, got, 2)
	require.Equal(t, int64(900), got[0].Amount)

	require.NoError(t, a.Release(ctx, "sb1"))
	require.NoError(t, a.Release(ctx, "sb1"))
	require.NoError(t, a.Claim(ctx, "sb2", []Allocation{{Kind: "vf", Item: "0000:3b:02.1"}}, nil))
}

// TestAllocationsConcurrentClaims races claimers for one core and for a
// counted kind with room for exactly one: one wins each.
func TestAllocationsConcurrentClaims(t *testing.T) {
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	a := s.Allocations()
	const n = 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			owner := fmt.Sprintf("sb%d", i)
			errs[i] = a.Claim(ctx, owner, []Allocation{
				{Kind: "hugepages-1Gi", Item: owner, Amount: 1 << 30},
				{Kind: "cpu", Item: fmt.Sprint(i)},
			}, map[string]int64{"hugepages-1Gi": 1 << 30})
		})
	}
	wg.Wait()
	won := 0
	for _, err := range errs {
		if err == nil {
			won++
			continue
		}
		require.ErrorIs(t, err, ErrInsufficient)
	}
	require.Equal(t, 1, won)
	rows, err := a.Kind(ctx, "cpu")
	require.NoError(t, err)
	require.Len(t, rows, 1)
}

func TestAllocationsRefuseBadInput(t *testing.T) {
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	a := s.Allocations()
	long := string(make([]byte, MaxAllocationField+1))
	for name, tt := range map[string]struct {
		owner string
		row   Allocation
		want  string
	}{
		"empty owner":     {"", Allocation{Kind: "cpu", Item: "1"}, "empty owner"},
		"empty kind":      {"sb", Allocation{Item: "1"}, "empty kind"},
		"empty item":      {"sb", Allocation{Kind: "cpu"}, "empty item"},
		"long item":       {"sb", Allocation{Kind: "cpu", Item: long}, "item is 257 bytes"},
		"negative amount": {"sb", Allocation{Kind: "hugepages-2Mi", Item: "sb", Amount: -1}, "negative amount"},
		"foreign row":     {"sb", Allocation{Owner: "other", Kind: "cpu", Item: "1"}, `row of owner "other"`},
		"large detail":    {"sb", Allocation{Kind: "vm", Item: "sb", Detail: make([]byte, MaxAllocationDetail+1)}, "detail of vm"},
	} {
		t.Run(name, func(t *testing.T) {
			err := a.Claim(ctx, tt.owner, []Allocation{tt.row}, nil)
			require.ErrorIs(t, err, ErrInvalid)
			require.ErrorContains(t, err, tt.want)
		})
	}
	all, err := a.Kind(ctx, "")
	require.NoError(t, err)
	require.Empty(t, all)
}

// ReleaseKinds drops the named kinds of one owner and keeps its other
// rows and every other owner's.
func TestAllocationsReleaseKinds(t *testing.T) {
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	a := s.Allocations()
	require.NoError(t, a.Claim(ctx, "sb1", []Allocation{{Kind: "cpu", Item: "1"}, {Kind: "vf", Item: "0000:3b:02.1"}, {Kind: "vm", Item: "sb1"}}, nil))
	require.NoError(t, a.Claim(ctx, "sb2", []Allocation{{Kind: "cpu", Item: "2"}}, nil))
	require.NoError(t, a.ReleaseKinds(ctx, "sb1", "cpu", "vf", "hugepages-2Mi"))
	got, err := a.Owner(ctx, "sb1")
	require.NoError(t, err)
	require.Len(t, got, 1)
	require.Equal(t, "vm", got[0].Kind)
	got, err = a.Owner(ctx, "sb2")
	require.NoError(t, err)
	require.Len(t, got, 1)
	require.NoError(t, a.ReleaseKinds(ctx, "sb1", "cpu"))
	require.NoError(t, a.Claim(ctx, "sb3", []Allocation{{Kind: "cpu", Item: "1"}}, nil))
}
