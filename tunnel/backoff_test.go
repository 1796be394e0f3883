package tunnel

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestBackoffGrowsJittersAndCaps(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second, rand: rand.New(rand.NewPCG(1, 2))}
	wantCeil := []time.Duration{100, 200, 400, 800, 1000, 1000, 1000}
	for i, ceil := range wantCeil {
		ceil *= time.Millisecond
		d := b.Next()
		require.GreaterOrEqual(t, d, ceil/2, "attempt %d", i)
		require.LessOrEqual(t, d, ceil, "attempt %d", i)
	}
	b.Reset()
	require.LessOrEqual(t, b.Next(), 100*time.Millisecond)
}

func TestBackoffJitterSpreads(t *testing.T) {
	seen := map[time.Duration]bool{}
	for i := range 20 {
		b := Backoff{Min: time.Second, Max: time.Minute, rand: rand.New(rand.NewPCG(uint64(i), 7))}
		seen[b.Next()] = true
	}
	require.Greater(t, len(seen), 10, "jitter should spread first delays")
}
