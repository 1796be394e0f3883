package hub

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// Rebalancing (docs/protocol.md, "Rebalancing"). Every replica publishes
// its session count in a Lease of its own (balancer.go); each looks at the
// others' and, when it holds more than its fair share, says goodbye to a
// few of its sessions with a hint naming the least loaded replica. The
// decision is this pure function:
//
//	live   = the replicas whose Lease was renewed within its duration
//	fair   = ceil(total sessions / live replicas)
//	excess = mine - fair                        (nothing to do when <= 0)
//	target = the live replica with the fewest sessions
//	move   = min(excess, fair - target's, max(1, mine × MaxFraction))
//
// Only replicas over the ceiling move edges, and only into the one
// replica most under it, at most a fraction of their sessions per round:
// the spread is gradual and does not overshoot, because after a move a
// replica decides again only on counts every peer published at least one
// period after it (the moved edges have reconnected by then: their
// back-off after a session is at most a second). A replica
// that returns empty therefore fills up over a few rounds, from every
// replica over the ceiling at once, each moving its share.

// load is one replica's published state.
type load struct {
	identity string
	address  string // what edges dial to reach it; "" when it has none
	sessions int
	renewed  time.Time
	duration time.Duration
}

// move is what one round decides: how many sessions to send away, and
// where to.
type move struct {
	count int
	hint  string
}

// plan decides one round for self, given its peers' published loads (its
// own Lease, if listed among them, is ignored), the time before which a
// count may not show its last move (zero: every count is good) and the
// fraction of its sessions it may move in one round.
func plan(self load, peers []load, now, settled time.Time, maxFraction float64) move {
	live := make([]load, 0, len(peers))
	for _, p := range peers {
		if p.identity == self.identity || now.Sub(p.renewed) > p.duration {
			continue
		}
		if !settled.IsZero() && !p.renewed.After(settled) {
			return move{} // its count may not show the last move yet
		}
		live = append(live, p)
	}
	if len(live) == 0 {
		return move{}
	}
	total := self.sessions
	for _, p := range live {
		total += p.sessions
	}
	fair := (total + len(live)) / (len(live) + 1) // ceil(total / replicas)
	excess := self.sessions - fair
	if excess <= 0 {
		return move{}
	}
	target := slices.MinFunc(live, func(a, b load) int {
		return cmp.Or(cmp.Compare(a.sessions, b.sessions), cmp.Compare(a.identity, b.identity))
	})
	step := max(1, int(math.Floor(float64(self.sessions)*maxFraction)))
	n := min(excess, fair-target.sessions, step)
	if n <= 0 {
		return move{}
	}
	return move{count: n, hint: target.address}
}
