package tunnel

import (
	"math/rand/v2"
	"time"
)

// Backoff computes reconnect delays: exponential from Min, capped at Max,
// with full jitter (each delay is uniform in [d/2, d]) so that many edges
// cut off at once do not reconnect in lockstep. It is a plain value with no
// clock: the caller sleeps.
type Backoff struct {
	// Min is the first delay. Default 500ms.
	Min time.Duration
	// Max caps the delay. Default 8s: an edge back on the network should
	// resume within seconds, and the jitter already spreads a fleet out.
	Max time.Duration

	attempt int
	rand    *rand.Rand
}

// Next returns the delay before the next attempt and advances.
func (b *Backoff) Next() time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 500 * time.Millisecond
	}
	if hi < lo {
		hi = max(lo, 8*time.Second)
	}
	d := lo
	for i := 0; i < b.attempt && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	b.attempt++
	if b.rand == nil {
		b.rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())) //nolint:gosec // jitter needs no cryptographic randomness
	}
	half := d / 2
	return half + time.Duration(b.rand.Int64N(int64(d-half)+1))
}

// Reset starts again from Min, after a connection that worked.
func (b *Backoff) Reset() { b.attempt = 0 }
