package hollow_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/tests/hollow"
)

// A window of the API server's metrics counts the requests made in it, by
// verb, with their durations, and nothing from before it.
func TestSampleAPI(t *testing.T) {
	env := cp.Env(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ns := env.Namespace(t)
	cs, err := kubernetes.NewForConfig(env.Config)
	require.NoError(t, err)
	before, err := hollow.SampleAPI(ctx, env.Config)
	require.NoError(t, err)
	const gets = 20
	for range gets {
		_, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		require.NoError(t, err)
	}
	after, err := hollow.SampleAPI(ctx, env.Config)
	require.NoError(t, err)
	w := after.Sub(before)
	// Other clients (the API server's own controllers) may add some.
	require.GreaterOrEqual(t, w.Requests["GET"], float64(gets))
	require.Contains(t, w.Verbs(), "GET")
	mean, p99 := w.Latency("GET", 0.99)
	require.Positive(t, mean)
	require.GreaterOrEqual(t, p99, mean/2, "a p99 far below the mean: the buckets were misread")
	_, none := w.Latency("no-such-verb", 0.99)
	require.Zero(t, none)
	empty := before.Sub(before)
	require.Zero(t, empty.Requests["GET"], "a sample less itself is empty")
	require.Empty(t, empty.Verbs(), "and so are its durations")
}
