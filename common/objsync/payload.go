package objsync

import (
	"errors"
	"fmt"
)

// Phase is the step of a reconcile a KindSync message carries.
type Phase uint8

// Sync phases. Values are part of the wire protocol: never renumber them.
const (
	// PhaseDigest (edge to cloud): Count and Buckets describe what the edge holds.
	PhaseDigest Phase = 1
	// PhaseWant (cloud to edge): list the entries of these Buckets, or,
	// when Sub is set, of those of their sub-buckets whose digest differs
	// from Sub (sub.go).
	PhaseWant Phase = 2
	// PhaseList (edge to cloud): Entries of the wanted buckets, or of the
	// sub-buckets named in Buckets when Caps has CapSubBuckets. A list
	// longer than MaxEntries is sent as several List messages in a row,
	// More set on all but the last; the cloud acts on the last.
	PhaseList Phase = 3
	// PhasePrune (cloud to edge): delete the objects with these key Hashes.
	// The edge acks it like an event, after its commit. More than
	// MaxEntries hashes are sent as several Prune messages, each acked.
	PhasePrune Phase = 4
	// PhaseDone (cloud to edge): every difference found has been queued;
	// the edge is in sync once the events before it are applied.
	PhaseDone Phase = 5
)

// Caps are the optional parts of the sync protocol a peer takes part in,
// a bit set. Fields that carry them were appended to Sync: a peer that
// predates them ignores them (decoders ignore trailing array elements) and
// never sets them.
type Caps uint32

// Capabilities. Values are part of the wire protocol: never renumber them.
const (
	// CapSubBuckets: in a Digest, the edge answers a Want that carries
	// Sub with the entries of the differing sub-buckets only; in a List,
	// Buckets names the sub-buckets (indexes among buckets·fan) whose
	// entries it holds, and every other sub-bucket of the wanted buckets
	// is in sync.
	CapSubBuckets Caps = 1 << 0
)

// Sync is the payload of a KindSync message. Which fields are set depends
// on Phase. On the wire it is the msgpack array [phase, count, buckets,
// entries, hashes, more, caps, sub].
type Sync struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	Phase Phase
	// Count is how many objects the edge holds (PhaseDigest).
	Count uint32
	// Buckets are bucket digests (PhaseDigest), bucket indexes
	// (PhaseWant), or the sub-bucket indexes listed (PhaseList with
	// CapSubBuckets).
	Buckets []uint64
	// Entries are the objects of the wanted buckets (PhaseList).
	Entries []Entry
	// Hashes are key hashes to delete (PhasePrune).
	Hashes []uint64
	// More says that another List of the same reconcile follows
	// (PhaseList only).
	More bool
	// Caps, in a Digest, are what the edge takes part in; in a List,
	// CapSubBuckets says that Buckets names the sub-buckets listed.
	Caps Caps
	// Sub are, in a Want, the cloud's digests of the sub-buckets of each
	// wanted bucket: len(Sub)/len(Buckets) per bucket, in order (SubDigest).
	Sub []uint64
}

// ErrBadSync is wrapped by every validation error of a Sync payload.
var ErrBadSync = errors.New("objsync: invalid sync payload")

// MaxEntries bounds the entries of one List or Prune; larger sets are sent
// in several messages.
const MaxEntries = 100_000

// Validate checks a Sync payload received from the network.
func (s *Sync) Validate() error {
	switch s.Phase {
	case PhaseDigest:
		nb := len(s.Buckets)
		if nb == 0 || nb > MaxBuckets || nb&(nb-1) != 0 {
			return fmt.Errorf("%w: digest of %d buckets, want a power of two up to %d", ErrBadSync, nb, MaxBuckets)
		}
	case PhaseWant:
		if len(s.Buckets) > MaxBuckets {
			return fmt.Errorf("%w: want of %d buckets", ErrBadSync, len(s.Buckets))
		}
		if len(s.Sub) > 0 {
			fan := 0
			if len(s.Buckets) > 0 && len(s.Sub)%len(s.Buckets) == 0 {
				fan = len(s.Sub) / len(s.Buckets)
			}
			if fan < 2 || fan > MaxFanout || fan&(fan-1) != 0 || len(s.Sub) > MaxBuckets {
				return fmt.Errorf("%w: want of %d buckets with %d sub-digests, want a power of two from 2 to %d per bucket, at most %d in all", ErrBadSync, len(s.Buckets), len(s.Sub), MaxFanout, MaxBuckets)
			}
		}
	case PhaseList:
		if len(s.Entries) > MaxEntries {
			return fmt.Errorf("%w: list of %d entries, limit %d", ErrBadSync, len(s.Entries), MaxEntries)
		}
		if len(s.Buckets) > MaxBuckets {
			return fmt.Errorf("%w: list of %d sub-buckets, limit %d", ErrBadSync, len(s.Buckets), MaxBuckets)
		}
	case PhasePrune:
		if len(s.Hashes) > MaxEntries {
			return fmt.Errorf("%w: prune of %d entries, limit %d", ErrBadSync, len(s.Hashes), MaxEntries)
		}
	case PhaseDone:
	default:
		return fmt.Errorf("%w: unknown phase %d", ErrBadSync, s.Phase)
	}
	return nil
}
