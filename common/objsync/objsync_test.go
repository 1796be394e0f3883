package objsync

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
)

func TestBucketCount(t *testing.T) {
	for _, tt := range []struct{ n, want int }{
		{0, 1}, {1, 1}, {16, 1}, {33, 2}, {400, 32}, {10_000, 1024}, {1 << 30, MaxBuckets},
	} {
		require.Equal(t, tt.want, BucketCount(tt.n), "n=%d", tt.n)
	}
}

func entries(n int, version string) []Entry {
	out := make([]Entry, n)
	for i := range out {
		k := Key{Kind: "Pod", Namespace: "default", Name: fmt.Sprintf("p-%d", i)}
		out[i] = Entry{Key: k.Hash(), Version: VersionHash("uid", version)}
	}
	return out
}

func TestDigestFindsOnlyChangedBuckets(t *testing.T) {
	edge := entries(10_000, "1")
	cloud := entries(10_000, "1")
	for i := range 10 {
		cloud[i*997].Version = VersionHash("uid", "2")
	}
	nb := BucketCount(len(edge))
	de, dc := NewDigest(nb), NewDigest(nb)
	for _, e := range edge {
		de.Add(e)
	}
	for _, e := range cloud {
		dc.Add(e)
	}
	diff := dc.Diff(de.Buckets)
	require.NotEmpty(t, diff)
	require.LessOrEqual(t, len(diff), 10, "only buckets holding a changed object differ")
	want := map[uint32]bool{}
	for i := range 10 {
		want[uint32(Bucket(cloud[i*997].Key, nb))] = true
	}
	for _, b := range diff {
		require.True(t, want[b])
	}
	// Same sets in any order give the same digest.
	dr := NewDigest(nb)
	for i := len(edge) - 1; i >= 0; i-- {
		dr.Add(edge[i])
	}
	require.Empty(t, dr.Diff(de.Buckets))
}

func TestKeyAndVersionHash(t *testing.T) {
	a := Key{Kind: "Pod", Namespace: "a", Name: "b/c"}
	b := Key{Kind: "Pod", Namespace: "a/b", Name: "c"}
	require.Equal(t, "/Pod/a/b/c", a.String())
	require.NotEqual(t, VersionHash("u1", "5"), VersionHash("u2", "5"), "a recreated object never matches")
	require.Equal(t, KeyOf(message.Resource{Kind: "Pod", Namespace: "a", Name: "b/c", UID: "x"}), a)
	_ = b
}

func TestSyncValidate(t *testing.T) {
	ok := []Sync{
		{Phase: PhaseDigest, Buckets: make([]uint64, 1)},
		{Phase: PhaseDigest, Buckets: make([]uint64, 1024)},
		{Phase: PhaseWant, Buckets: []uint64{1, 2}},
		{Phase: PhaseList},
		{Phase: PhasePrune, Hashes: []uint64{1}},
		{Phase: PhaseDone},
	}
	for _, s := range ok {
		require.NoError(t, s.Validate())
	}
	bad := []Sync{
		{Phase: 0},
		{Phase: 9},
		{Phase: PhaseDigest},
		{Phase: PhaseDigest, Buckets: make([]uint64, 3)},
		{Phase: PhaseDigest, Buckets: make([]uint64, 2*MaxBuckets)},
		{Phase: PhaseList, Entries: make([]Entry, MaxEntries+1)},
	}
	for _, s := range bad {
		require.ErrorIs(t, s.Validate(), ErrBadSync, "%+v", s.Phase)
	}
}

func FuzzSyncPayload(f *testing.F) {
	c := message.NewCodec(1 << 20)
	for _, s := range []Sync{{Phase: PhaseDigest, Count: 3, Buckets: []uint64{1, 2}}, {Phase: PhaseList, Entries: []Entry{{Key: 1, Version: 2}}}} {
		b, err := c.Append(nil, &s)
		require.NoError(f, err)
		f.Add(b)
	}
	f.Fuzz(func(_ *testing.T, in []byte) {
		var s Sync
		if err := c.UnmarshalValue(in, &s); err == nil {
			_ = s.Validate()
		}
	})
}
