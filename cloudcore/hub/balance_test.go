package hub

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestPlan(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	fresh := now.Add(-time.Second)
	peer := func(id string, n int) load {
		return load{identity: id, address: id + ":10000", sessions: n, renewed: fresh, duration: 30 * time.Second}
	}
	for _, tc := range []struct {
		name     string
		mine     int
		peers    []load
		lastMove time.Time
		want     move
	}{
		{"alone", 100, nil, time.Time{}, move{}},
		{"balanced", 2, []load{peer("b", 2), peer("c", 2)}, time.Time{}, move{}},
		{"within the ceiling", 3, []load{peer("b", 3), peer("c", 1)}, time.Time{}, move{}},
		{"a returned replica gets one per round from each", 3, []load{peer("b", 3), peer("c", 0)}, time.Time{}, move{1, "c:10000"}},
		{"the least loaded is the target", 10, []load{peer("b", 4), peer("c", 6)}, time.Time{}, move{1, "b:10000"}},
		{"a fraction per round", 1000, []load{peer("b", 0)}, time.Time{}, move{50, "b:10000"}},
		{"never past the target's share", 100, []load{peer("b", 95), peer("c", 95)}, time.Time{}, move{2, "b:10000"}},
		{"never past the excess", 510, []load{peer("b", 490)}, time.Time{}, move{10, "b:10000"}},
		{"an expired replica is not counted", 4, []load{peer("b", 4), {identity: "c", sessions: 0, renewed: now.Add(-time.Minute), duration: 30 * time.Second}}, time.Time{}, move{}},
		{"its own lease is ignored", 4, []load{{identity: "a", sessions: 0, renewed: fresh, duration: 30 * time.Second}, peer("b", 4)}, time.Time{}, move{}},
		{"counts older than the last move wait", 3, []load{peer("b", 3), peer("c", 0)}, fresh, move{}},
		{"counts newer than the last move go", 3, []load{peer("b", 3), peer("c", 0)}, fresh.Add(-time.Second), move{1, "c:10000"}},
		{"a target without an address: no hint", 4, []load{{identity: "b", sessions: 0, renewed: fresh, duration: 30 * time.Second}}, time.Time{}, move{1, ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := plan(load{identity: "a", sessions: tc.mine}, tc.peers, now, tc.lastMove, DefaultMoveFraction)
			require.Equal(t, tc.want, got)
		})
	}
}

// TestPlanConverges: replicas acting on each other's published counts,
// round after round, reach a spread within the ceiling and then stop,
// without moving any session twice in a round or overshooting.
func TestPlanConverges(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	counts := map[string]int{"a": 700, "b": 300, "c": 0, "d": 1}
	ids := []string{"a", "b", "c", "d"}
	total := 1001
	for round := range 200 {
		now = now.Add(10 * time.Second)
		published := make([]load, 0, len(ids))
		for _, id := range ids {
			published = append(published, load{identity: id, address: id, sessions: counts[id], renewed: now, duration: 30 * time.Second})
		}
		moved := 0
		for _, id := range ids {
			m := plan(load{identity: id, sessions: counts[id]}, published, now.Add(time.Second), time.Time{}, DefaultMoveFraction)
			require.LessOrEqual(t, m.count, counts[id])
			counts[id] -= m.count
			counts[m.hint] += m.count
			moved += m.count
		}
		sum := 0
		for _, n := range counts {
			sum += n
		}
		require.Equal(t, total, sum, "round %d", round)
		if moved == 0 {
			for id, n := range counts {
				require.LessOrEqual(t, n, (total+3)/4, "%s over the ceiling when it stopped", id)
			}
			return
		}
	}
	t.Fatalf("no convergence in 200 rounds: %v", counts)
}
