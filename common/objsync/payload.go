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
	// PhaseWant (cloud to edge): list the entries of these Buckets.
	PhaseWant Phase = 2
	// PhaseList (edge to cloud): Entries of the wanted buckets. A list
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

// Sync is the payload of a KindSync message. Which fields are set depends
// on Phase.
type Sync struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	Phase Phase
	// Count is how many objects the edge holds (PhaseDigest).
	Count uint32
	// Buckets are bucket digests (PhaseDigest) or bucket indexes (PhaseWant).
	Buckets []uint64
	// Entries are the objects of the wanted buckets (PhaseList).
	Entries []Entry
	// Hashes are key hashes to delete (PhasePrune).
	Hashes []uint64
	// More says that another List of the same reconcile follows
	// (PhaseList only).
	More bool
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
	case PhaseList:
		if len(s.Entries) > MaxEntries {
			return fmt.Errorf("%w: list of %d entries, limit %d", ErrBadSync, len(s.Entries), MaxEntries)
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
