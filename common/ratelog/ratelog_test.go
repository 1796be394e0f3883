package ratelog

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestAllowOncePerCause(t *testing.T) {
	now := time.Unix(1000, 0)
	l := New(time.Minute, func() time.Time { return now })
	ok, n := l.Allow("a")
	require.True(t, ok)
	require.Zero(t, n)
	for range 5 {
		ok, _ = l.Allow("a")
		require.False(t, ok)
	}
	ok, _ = l.Allow("b")
	require.True(t, ok, "another cause is logged at once")
	now = now.Add(time.Minute)
	ok, n = l.Allow("a")
	require.True(t, ok)
	require.Equal(t, 5, n, "the suppressed count is reported once the cause is logged again")
}

func TestBoundedCauses(t *testing.T) {
	now := time.Unix(1000, 0)
	l := New(time.Hour, func() time.Time { return now })
	for i := range 3 * maxCauses {
		now = now.Add(time.Millisecond)
		ok, _ := l.Allow(fmt.Sprint(i))
		require.True(t, ok)
	}
	require.LessOrEqual(t, len(l.causes), maxCauses)
}
