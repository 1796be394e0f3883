package pods

import "time"

// backoff is kubelet's crash-loop back-off, made restart-safe: instead of a
// map in memory, each container instance carries its back-off step in a CRI
// annotation (annotationBackoffStep), so an EdgeCore restart neither resets
// nor forgets it.
//
// When an instance that carried step k exits after running for d, the next
// instance may start base·2^k after the exit (at most max), and carries step
// k+1; an instance that ran at least reset restarts after base again. With
// kubelet's values the delays are 10s, 20s, 40s, ... 5m, and back to 10s
// after 10 minutes of running.
type backoff struct {
	base, max, reset time.Duration
}

// delay returns how long after its exit an instance with step may be
// replaced, and the step its replacement carries.
func (b backoff) delay(step int, ranFor time.Duration) (time.Duration, int) {
	if ranFor >= b.reset || step < 0 {
		step = 0
	}
	d := b.base
	for i := 0; i < step && d < b.max; i++ {
		d *= 2
	}
	return min(d, b.max), step + 1
}
