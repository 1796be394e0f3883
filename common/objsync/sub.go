package objsync

import "math/bits"

// Sub-buckets: a second digest level for the buckets that differ.
//
// Bucket b of an nb-bucket digest splits into fan sub-buckets: buckets b,
// b+nb, ..., b+(fan-1)·nb of an (nb·fan)-bucket digest. Bucket takes the
// low bits of one mix of the key hash, so every object of bucket b lands
// in exactly one of them, and the digest of b is the XOR of theirs.
//
// When the edge's Digest has CapSubBuckets, the cloud's Want may carry, for
// each wanted bucket in order, the digests of its fan sub-buckets over
// what the edge should hold (Sync.Sub). The edge then lists only the
// entries of the sub-buckets whose digest differs from its own and names
// those sub-buckets in the List (Buckets, with CapSubBuckets set). A
// sub-bucket whose digest matches is in sync, exactly as a matching bucket
// is: the same 64-bit digest decides, no hash bit is dropped.
//
// Cost of one wanted bucket of e entries, in msgpack bytes (a uint64
// takes 9, an entry 19, a sub-bucket index up to 5), when one of its
// objects changed: listing it costs 19·e up; splitting it costs 9·fan
// down and 5 + 19·e/fan up. At 400 objects (32 buckets of about 12) that
// is 230 B against 100 B with fan 4. Fanout picks the fan that minimises
// the sum, so small buckets are listed whole.

// MaxFanout bounds the sub-buckets per bucket a Want may carry.
const MaxFanout = 16

// Fanout returns how many sub-buckets each wanted bucket is split into
// when the wanted buckets hold perBucket entries on average: the power of
// two up to MaxFanout that minimises the bytes above, 1 when listing the
// buckets whole is cheapest.
func Fanout(perBucket int) int {
	best, bestCost := 1, 19*perBucket
	for fan := 2; fan <= MaxFanout; fan *= 2 {
		if c := 9*fan + 5 + 19*perBucket/fan; c < bestCost {
			best, bestCost = fan, c
		}
	}
	return best
}

// SubDigest accumulates the digests of the sub-buckets of some buckets of
// an nb-bucket digest. Make one with NewSubDigest.
type SubDigest struct {
	nb, fan int
	shift   int            // log2(nb): a sub-bucket's index over nb
	pos     map[uint64]int // wanted bucket -> its position in buckets
	buckets []uint64
	// Sums are the sub-bucket digests: fan per wanted bucket, in the
	// order of the buckets given to NewSubDigest, sub-bucket b+j·nb at
	// position·fan+j. It is what a Want carries in Sub.
	Sums []uint64
}

// NewSubDigest returns empty digests of the fan sub-buckets of each of
// buckets (indexes among nb, a power of two; fan is a power of two too).
// An index repeated, or not below nb, gets sub-digests that nothing is
// added to.
func NewSubDigest(nb, fan int, buckets []uint64) *SubDigest {
	s := &SubDigest{
		nb: nb, fan: fan, shift: bits.TrailingZeros(uint(nb)),
		pos: make(map[uint64]int, len(buckets)), buckets: buckets,
		Sums: make([]uint64, len(buckets)*fan),
	}
	for i, b := range buckets {
		if _, dup := s.pos[b]; !dup && b < uint64(nb) {
			s.pos[b] = i
		}
	}
	return s
}

// Sub returns the sub-bucket of a key hash: its index among nb·fan.
func (s *SubDigest) Sub(key uint64) uint64 { return uint64(Bucket(key, s.nb*s.fan)) }

// Add folds e into its sub-bucket if its bucket is one of those given;
// it reports whether it was.
func (s *SubDigest) Add(e Entry) bool {
	c := s.Sub(e.Key)
	i, ok := s.pos[c&uint64(s.nb-1)]
	if !ok {
		return false
	}
	s.Sums[i*s.fan+int(c>>s.shift)] ^= e.sum()
	return true
}

// Diff returns the sub-buckets (indexes among nb·fan) whose digest differs
// from other's, which holds fan digests per bucket in the same order (a
// Want's Sub). Buckets not below nb are skipped.
func (s *SubDigest) Diff(other []uint64) []uint64 {
	var out []uint64
	for i, v := range s.Sums {
		b := s.buckets[i/s.fan]
		if b >= uint64(s.nb) {
			continue
		}
		if i >= len(other) || other[i] != v {
			out = append(out, b+uint64(i%s.fan)<<s.shift)
		}
	}
	return out
}
