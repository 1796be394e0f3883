package chaos

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"
)

// step is one timed fault action, at an offset from the start of the churn.
type step struct {
	at   time.Duration
	what string
	do   func(r *rig) error
}

// schedule is the churn's length and the faults during it. The path is
// clean again at the end.
type schedule struct {
	name   string
	length time.Duration
	steps  []step
}

const pathDelay = 80 * time.Millisecond

// Builders of fault phases.

func delayOn(at time.Duration) []step {
	return []step{{at, fmt.Sprintf("delay %s each way", pathDelay), func(r *rig) error { r.proxy.SetDelay(pathDelay); return nil }}}
}

// lossy re-rolls the loss between 20 and 40 % every 2 s in [from, to),
// and ends it at to.
func lossy(from, to time.Duration) []step {
	var out []step
	for at := from; at < to; at += 2 * time.Second {
		out = append(out, step{at, "loss 20-40%", func(r *rig) error {
			p := 0.2 + 0.2*r.rng.Float64()
			r.proxy.SetLoss(p)
			r.note("loss set to %.0f%%", 100*p)
			return nil
		}})
	}
	return append(out, step{to, "loss off", func(r *rig) error { r.proxy.SetLoss(0); return nil }})
}

// partitionFor starts the name of a partition's first step; its length
// follows.
const partitionFor = "partition for "

func partition(from, length time.Duration) []step {
	return []step{
		{from, partitionFor + length.String(), func(r *rig) error { r.proxy.Partition(true); return nil }},
		{from + length, "partition healed", func(r *rig) error { r.proxy.Partition(false); return nil }},
	}
}

// flaps cuts the path for 2 s, n times, 2 s apart.
func flaps(from time.Duration, n int) []step {
	var out []step
	for i := range n {
		out = append(out, partition(from+time.Duration(4*i)*time.Second, 2*time.Second)...)
	}
	return out
}

// killEdge kills edge i with SIGKILL and starts it again 2 s later.
func killEdge(at time.Duration, i int) []step {
	return []step{
		{at, fmt.Sprintf("SIGKILL edge %d", i), func(r *rig) error { r.edges[i].proc.kill(); return nil }},
		{at + 2*time.Second, fmt.Sprintf("restart edge %d", i), func(r *rig) error { return r.restartEdge(i) }},
	}
}

func killCloud(at time.Duration) []step {
	return []step{
		{at, "SIGKILL cloudcore", func(r *rig) error { r.cloud.kill(); return nil }},
		{at + 2*time.Second, "restart cloudcore", func(r *rig) error { return r.cloud.start() }},
	}
}

func clean(at time.Duration) []step {
	return []step{{at, "path clean", func(r *rig) error { r.clean(); return nil }}}
}

func newSchedule(name string, length time.Duration, phases ...[]step) schedule {
	var steps []step
	for _, p := range phases {
		steps = append(steps, p...)
	}
	slices.SortStableFunc(steps, func(a, b step) int { return cmp.Compare(a.at, b.at) })
	return schedule{name: name, length: length, steps: steps}
}

// fullSchedule is two minutes of churn with every fault of the issue:
// 20-40 % loss, 80 ms delay, a 20 s partition (sessions may end), 2 s
// flaps, two 12 s partitions (the sessions survive them and the cloud
// resends; each is followed by 8 s with delay only, for the first copies
// and the resends to land), each edge and the cloud killed with SIGKILL and
// restarted. QUIC edges notice the cloud's restart only at the dead-peer
// timeout (the server sends no stateless reset), after the churn.
func fullSchedule() schedule {
	s := time.Second
	return newSchedule("full", 120*s,
		delayOn(5*s), lossy(5*s, 20*s),
		partition(20*s, 20*s),
		flaps(40*s, 4), lossy(40*s, 58*s),
		partition(58*s, 12*s),
		lossy(78*s, 90*s),
		killEdge(78*s, 0),
		killEdge(86*s, 1),
		partition(90*s, 12*s),
		lossy(110*s, 114*s),
		killCloud(106*s),
		clean(114*s),
	)
}

// shortSchedule is one minute of the same churn and faults but the 20 s
// partition (the process kills end sessions too). The second 12 s
// partition catches the WebSocket edges, which are back on the restarted
// cloud by then; the QUIC ones are not (see keepAlive).
func shortSchedule() schedule {
	s := time.Second
	return newSchedule("short", 60*s,
		delayOn(3*s), lossy(3*s, 8*s),
		partition(8*s, 12*s),
		lossy(28*s, 52*s),
		killEdge(24*s, 0),
		flaps(28*s, 2),
		killEdge(32*s, 1),
		killCloud(38*s),
		partition(44*s, 12*s),
		clean(56*s),
	)
}

// cut is a partition of the schedule: when it starts and how long it lasts.
type cut struct{ at, length time.Duration }

// longCuts returns the partitions that hold changes back long enough to
// need a resend (not the 2 s flaps): the windows the churn must fill for a
// run to count.
func (s schedule) longCuts() []cut {
	var out []cut
	for _, st := range s.steps {
		rest, ok := strings.CutPrefix(st.what, partitionFor)
		if !ok {
			continue
		}
		if d, err := time.ParseDuration(rest); err == nil && d >= 10*time.Second {
			out = append(out, cut{st.at, d})
		}
	}
	return out
}

// run performs the steps at their times until ctx ends; it records what
// it did, and when, in r's timeline.
func (s schedule) run(ctx context.Context, r *rig, start time.Time) error {
	for _, st := range s.steps {
		if !waitUntil(ctx, start.Add(st.at)) {
			return ctx.Err()
		}
		began := time.Since(start)
		if err := st.do(r); err != nil {
			return fmt.Errorf("fault step %q at %s: %w", st.what, st.at, err)
		}
		r.note("%s (planned %s, began %s, took %s)", st.what, st.at, began.Round(10*time.Millisecond),
			(time.Since(start) - began).Round(10*time.Millisecond))
	}
	return nil
}

// waitUntil waits for t (a timed schedule, not synchronisation); false if
// ctx ended first.
func waitUntil(ctx context.Context, t time.Time) bool {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (s schedule) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s schedule, %s of churn:", s.name, s.length)
	for _, st := range s.steps {
		if st.what == "loss 20-40%" {
			continue // one line per re-roll would drown the rest
		}
		fmt.Fprintf(&b, "\n  %6s %s", st.at, st.what)
	}
	return b.String()
}

// newRand is the schedule's randomness (loss levels), logged for replay.
func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 1)) }
