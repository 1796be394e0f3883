package chaos

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/apimachinery/pkg/types"
)

// TestCheckOrder shows that the history check finds each way of going
// back, and accepts what is legitimate (reapplying a version, a restart's
// snapshot, a recreated object).
func TestCheckOrder(t *testing.T) {
	vers := newVersions()
	vers.saw(types.UID("u1"), "10")
	vers.saw(types.UID("u1"), "20")
	vers.gone(types.UID("u1"))
	vers.saw(types.UID("u2"), "30")
	const k = "/Secret/ns/s"
	u := func(uid, rv string) applied { return applied{op: 'U', key: k, held: held{uid, rv}, src: "run 1"} }
	del := applied{op: 'D', key: k, src: "run 1"}
	snap := func(m map[string]held) applied { return applied{op: 'S', snap: m, src: "snapshot"} }
	for name, tc := range map[string]struct {
		history []applied
		bad     int
	}{
		"versions in order, one applied twice": {[]applied{u("u1", "10"), u("u1", "20"), u("u1", "20")}, 0},
		"deleted, then recreated":              {[]applied{u("u1", "20"), del, u("u2", "30")}, 0},
		"older version after a newer one":      {[]applied{u("u1", "20"), u("u1", "10")}, 1},
		"deleted object back":                  {[]applied{u("u1", "20"), del, u("u1", "20")}, 1},
		"stale delete of a live object":        {[]applied{u("u2", "30"), del}, 1},
		"prune of a deleted object":            {[]applied{u("u1", "20"), {op: 'P', key: k, src: "run 1"}}, 0},
		"snapshot after a kill holds the last": {[]applied{u("u1", "10"), snap(map[string]held{k: {"u1", "20"}})}, 0},
		"snapshot went back":                   {[]applied{u("u1", "20"), snap(map[string]held{k: {"u1", "10"}})}, 1},
		"snapshot lost a live object":          {[]applied{u("u2", "30"), snap(map[string]held{})}, 1},
	} {
		t.Run(name, func(t *testing.T) {
			require.Len(t, checkOrder("edge", tc.history, vers), tc.bad)
		})
	}
}

// TestReadAppliedDropsTornLine: a kill in the middle of a line leaves a
// prefix that is not a change.
func TestReadAppliedDropsTornLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "applied")
	now := time.Now().UnixNano()
	require.NoError(t, os.WriteFile(path, []byte(
		"U\t"+strconv.FormatInt(now, 10)+"\t/Pod/ns/p\tu1\t5\n"+
			"D\t"+strconv.FormatInt(now, 10)+"\t/Pod/ns/p\n"+
			"U\t"+strconv.FormatInt(now, 10)+"\t/Pod/ns/p\tu1\t1"), 0o600))
	a, err := readApplied(path, "run 1")
	require.NoError(t, err)
	require.Len(t, a, 2)
	require.Equal(t, held{"u1", "5"}, a[0].held)
	require.Equal(t, byte('D'), a[1].op)
}

// The windows the churn must fill are the schedules' long partitions, not
// the 2 s flaps.
func TestLongCuts(t *testing.T) {
	s := time.Second
	require.Equal(t, []cut{{8 * s, 12 * s}, {44 * s, 12 * s}}, shortSchedule().longCuts())
	require.Equal(t, []cut{{20 * s, 20 * s}, {58 * s, 12 * s}, {90 * s, 12 * s}}, fullSchedule().longCuts())
}
