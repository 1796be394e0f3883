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
		{Phase: PhaseDigest, Buckets: make([]uint64, 32), Caps: CapSubBuckets},
		{Phase: PhaseWant, Buckets: []uint64{1, 2}, Sub: make([]uint64, 8)},
		{Phase: PhaseWant, Buckets: []uint64{1}, Sub: make([]uint64, MaxFanout)},
		{Phase: PhaseList, Caps: CapSubBuckets, Buckets: []uint64{5}},
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
		{Phase: PhaseList, Buckets: make([]uint64, MaxBuckets+1)},
		{Phase: PhaseWant, Sub: make([]uint64, 4)},                                      // no buckets
		{Phase: PhaseWant, Buckets: []uint64{1, 2}, Sub: make([]uint64, 3)},             // not a multiple
		{Phase: PhaseWant, Buckets: []uint64{1, 2}, Sub: make([]uint64, 2)},             // one per bucket
		{Phase: PhaseWant, Buckets: []uint64{1, 2}, Sub: make([]uint64, 12)},            // 6 per bucket
		{Phase: PhaseWant, Buckets: []uint64{1}, Sub: make([]uint64, 2*MaxFanout)},      // too many per bucket
		{Phase: PhaseWant, Buckets: make([]uint64, 2048), Sub: make([]uint64, 16384*2)}, // too many in all
	}
	for _, s := range bad {
		require.ErrorIs(t, s.Validate(), ErrBadSync, "%+v", s.Phase)
	}
}

func FuzzSyncPayload(f *testing.F) {
	c := message.NewCodec(1 << 20)
	for _, s := range []Sync{
		{Phase: PhaseDigest, Count: 3, Buckets: []uint64{1, 2}},
		{Phase: PhaseList, Entries: []Entry{{Key: 1, Version: 2}}},
		{Phase: PhaseDigest, Count: 3, Buckets: []uint64{1, 2}, Caps: CapSubBuckets},
		{Phase: PhaseWant, Buckets: []uint64{3}, Sub: []uint64{1, 2, 3, 4}},
		{Phase: PhaseList, Entries: []Entry{{Key: 1, Version: 2}}, Caps: CapSubBuckets, Buckets: []uint64{35}},
	} {
		b, err := c.Append(nil, &s)
		require.NoError(f, err)
		f.Add(b)
	}
	f.Fuzz(func(_ *testing.T, in []byte) {
		var s Sync
		if err := c.UnmarshalValue(in, &s); err != nil || s.Validate() != nil {
			return
		}
		if s.Phase == PhaseWant && len(s.Sub) > 0 {
			// What the edge does with a valid want's sub-digests.
			sd := NewSubDigest(32, len(s.Sub)/len(s.Buckets), s.Buckets)
			for _, e := range entries(64, "1") {
				sd.Add(e)
			}
			_ = sd.Diff(s.Sub)
		}
	})
}

func TestFanout(t *testing.T) {
	for _, tt := range []struct{ perBucket, want int }{
		{0, 1}, {1, 1}, {2, 1}, {3, 2}, {4, 4}, {12, 4}, {16, 8}, {40, 8}, {1000, 16},
	} {
		require.Equal(t, tt.want, Fanout(tt.perBucket), "perBucket=%d", tt.perBucket)
	}
}

// A bucket's sub-buckets partition it: their digests XOR to the bucket's,
// and a changed object makes exactly its own sub-bucket differ.
func TestSubDigest(t *testing.T) {
	edge := entries(400, "1")
	cloud := entries(400, "1")
	cloud[7].Version = VersionHash("uid", "2")
	nb := BucketCount(len(edge))
	de, dc := NewDigest(nb), NewDigest(nb)
	for i := range edge {
		de.Add(edge[i])
		dc.Add(cloud[i])
	}
	diff := dc.Diff(de.Buckets)
	require.Equal(t, []uint32{uint32(Bucket(cloud[7].Key, nb))}, diff)
	want := []uint64{uint64(diff[0]), uint64(nb + 3), uint64(diff[0])} // one beyond nb, one repeated
	for _, fan := range []int{2, 4, 16} {
		se, sc := NewSubDigest(nb, fan, want), NewSubDigest(nb, fan, want)
		in := 0
		for i := range edge {
			if se.Add(edge[i]) {
				in++
			}
			sc.Add(cloud[i])
		}
		var x uint64
		for _, v := range se.Sums[:fan] {
			x ^= v
		}
		require.Equal(t, de.Buckets[diff[0]], x, "fan %d: the sub-buckets XOR to the bucket", fan)
		n := 0
		for _, e := range edge {
			if Bucket(e.Key, nb) == int(diff[0]) {
				n++
				require.Equal(t, uint64(Bucket(e.Key, nb)), se.Sub(e.Key)%uint64(nb), "a sub-bucket lies in its bucket")
			}
		}
		require.Equal(t, n, in, "only the wanted bucket's entries are added")
		got := se.Diff(sc.Sums)
		require.Equal(t, []uint64{sc.Sub(cloud[7].Key)}, got,
			"fan %d: only the changed object's sub-bucket differs (a repeated bucket's second place stays empty)", fan)
	}
}

// The fields appended for sub-buckets (caps, sub) cross peers that predate
// them: an old decoder ignores them, a new one reads an old payload with
// them empty.
func TestSyncPayloadAcrossVersions(t *testing.T) {
	type oldSync struct {
		_struct bool `codec:",toarray"` //nolint:unused // encode as an array

		Phase   Phase
		Count   uint32
		Buckets []uint64
		Entries []Entry
		Hashes  []uint64
		More    bool
	}
	c := message.NewCodec(0)
	b, err := c.Append(nil, &Sync{Phase: PhaseWant, Buckets: []uint64{3}, Sub: []uint64{1, 2}, Caps: CapSubBuckets})
	require.NoError(t, err)
	var o oldSync
	require.NoError(t, c.UnmarshalValue(b, &o))
	require.Equal(t, PhaseWant, o.Phase)
	require.Equal(t, []uint64{3}, o.Buckets)

	b, err = c.Append(nil, &oldSync{Phase: PhaseDigest, Count: 2, Buckets: []uint64{9}})
	require.NoError(t, err)
	var n Sync
	require.NoError(t, c.UnmarshalValue(b, &n))
	require.Equal(t, PhaseDigest, n.Phase)
	require.Equal(t, []uint64{9}, n.Buckets)
	require.Zero(t, n.Caps, "an old edge does not take sub-buckets")
	require.Empty(t, n.Sub)
	require.NoError(t, n.Validate())
}
