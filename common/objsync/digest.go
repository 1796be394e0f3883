package objsync

import "math/bits"

// Reconcile after a reconnect (docs/protocol.md, "Sync"):
//
//  1. The edge sends a Digest: how many objects it holds and, for each of
//     nb buckets (objects are spread over buckets by key hash), the XOR of
//     a mix of (key hash, version hash) of every object in that bucket.
//  2. The cloud computes the same digest over the objects the node should
//     hold now, from its informer cache. Equal buckets are in sync: nothing
//     in them crosses the wire. For the others it sends Want{buckets}.
//  3. The edge answers List: the (key hash, version hash) entries of the
//     wanted buckets only. When the edge said it can (CapSubBuckets) and the
//     buckets are large, the Want also carries the cloud's digests of each
//     wanted bucket's sub-buckets (sub.go), and the edge lists only the
//     sub-buckets whose digest differs from its own.
//  4. The cloud sends events for objects the edge lacks or holds at another
//     version, a Prune with the key hashes the edge holds but should not,
//     and Done.
//
// The cost is 8 bytes per bucket (about one bucket per 16 objects) plus
// 16 bytes per object in buckets that differ (in sub-buckets that differ,
// when the Want carries sub-digests), so it grows with what changed, not
// with what exists.

// MaxBuckets bounds the digest a peer may send or ask for.
const MaxBuckets = 1 << 14

// BucketCount returns the number of digest buckets for n objects: a power
// of two near n/16, between 1 and MaxBuckets.
func BucketCount(n int) int {
	target := n / 16
	if target <= 1 {
		return 1
	}
	nb := 1 << bits.Len(uint(target-1))
	return min(nb, MaxBuckets)
}

// Bucket returns the bucket of a key hash among nb (a power of two).
func Bucket(keyHash uint64, nb int) int {
	return int(mix64(keyHash) & uint64(nb-1))
}

// Digest accumulates bucket digests. The zero value is not usable; make one
// with NewDigest.
type Digest struct {
	Buckets []uint64
}

// NewDigest returns an empty digest of nb buckets.
func NewDigest(nb int) *Digest { return &Digest{Buckets: make([]uint64, nb)} }

// Add folds one object into its bucket. Adding the same entry twice cancels
// it out, so callers add each key once.
func (d *Digest) Add(e Entry) {
	d.Buckets[Bucket(e.Key, len(d.Buckets))] ^= e.sum()
}

// sum is what an entry contributes to the digest of its bucket (and of its
// sub-bucket).
func (e Entry) sum() uint64 {
	return mix64(e.Key ^ bits.RotateLeft64(e.Version, 29) ^ 0x9e3779b97f4a7c15)
}

// Diff returns the buckets in which d and other differ. Both must have the
// same number of buckets.
func (d *Digest) Diff(other []uint64) []uint32 {
	var out []uint32
	for i, v := range d.Buckets {
		if i >= len(other) || other[i] != v {
			out = append(out, uint32(i))
		}
	}
	return out
}

// mix64 is the splitmix64 finaliser: it spreads every input bit over the
// output so that XORed digests of different sets collide only by chance.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
