// Package ratelog bounds how often one cause is logged: a refusal an
// attacker can repeat thousands of times a second is logged once per
// cause and interval, with the count of the ones suppressed since. It
// only decides; the caller logs (and counts every occurrence in its
// metrics, which are never rate-limited).
package ratelog

import (
	"sync"
	"time"
)

// DefaultEvery is the interval used when New is given zero.
const DefaultEvery = time.Minute

// maxCauses bounds the causes remembered; beyond it the oldest half is
// forgotten (a forgotten cause is simply logged again).
const maxCauses = 4096

// Limiter remembers when each cause was last logged. The zero value is not
// usable; make one with New. It is safe for concurrent use.
type Limiter struct {
	every time.Duration
	now   func() time.Time

	mu     sync.Mutex
	causes map[string]*entry
}

type entry struct {
	last       time.Time
	suppressed int
}

// New returns a limiter that allows each cause once per every (zero:
// DefaultEvery). now may be nil (time.Now).
func New(every time.Duration, now func() time.Time) *Limiter {
	if every <= 0 {
		every = DefaultEvery
	}
	if now == nil {
		now = time.Now
	}
	return &Limiter{every: every, now: now, causes: make(map[string]*entry)}
}

// Allow reports whether cause should be logged now and, if so, how many
// occurrences of it were suppressed since it was last logged.
func (l *Limiter) Allow(cause string) (ok bool, suppressed int) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.causes[cause]
	if e == nil {
		if len(l.causes) >= maxCauses {
			l.forgetOldest()
		}
		l.causes[cause] = &entry{last: now}
		return true, 0
	}
	if now.Sub(e.last) < l.every {
		e.suppressed++
		return false, 0
	}
	n := e.suppressed
	e.last, e.suppressed = now, 0
	return true, n
}

func (l *Limiter) forgetOldest() {
	var cutoff time.Time
	for _, e := range l.causes {
		if cutoff.IsZero() || e.last.Before(cutoff) {
			cutoff = e.last
		}
	}
	// Drop everything older than the midpoint between the oldest entry and
	// now: about half, in one pass, without sorting.
	mid := cutoff.Add(l.now().Sub(cutoff) / 2)
	for k, e := range l.causes {
		if !e.last.After(mid) {
			delete(l.causes, k)
		}
	}
}
