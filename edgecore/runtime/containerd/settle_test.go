package containerd

import (
	"context"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/edgecore/cri"
	host "github.com/tetheredge/tether/tests/containerd"
)

// TestSettleExitBound: an exit the CRI never confirms (here: the event
// names a container that is still running) is delivered once ExitSettle
// has passed, and counted as unsettled; one the CRI shows (the container
// stopped, or an id it does not know at all) is delivered at once and
// counted as settled.
func TestSettleExitBound(t *testing.T) {
	h := host.Start(t)
	ctx := klog.NewContext(context.Background(), logr.Discard())
	reg := prometheus.NewRegistry()
	b, err := New(ctx, Config{Endpoint: h.Endpoint(), ExitSettle: 300 * time.Millisecond, Registerer: reg})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, b.Close(ctx)) })
	subCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := b.Events(subCtx)

	sb := h.PodSandboxConfig("settle", true)
	podID, err := b.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	id, err := b.CreateContainer(ctx, podID, h.BusyboxContainer("sleeper", "sleep", "3600"), sb)
	require.NoError(t, err)
	require.NoError(t, b.StartContainer(ctx, id))

	deliver := func(id string) cri.Event {
		t.Helper()
		b.settleExit(ctx, cri.Event{ContainerID: id, Kind: cri.EventExit, ExitCode: 1})
		select {
		case ev := <-events:
			return ev
		default:
			require.FailNow(t, "settleExit returned without delivering")
			return cri.Event{}
		}
	}
	start := time.Now()
	require.Equal(t, id, deliver(id).ContainerID)
	require.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond, "it waited for the CRI before giving up")
	require.InDelta(t, 1, testutil.ToFloat64(b.exits.WithLabelValues("unsettled")), 0)
	require.InDelta(t, 0, testutil.ToFloat64(b.exits.WithLabelValues("settled")), 0)

	require.NoError(t, b.StopContainer(ctx, id, 0))
	require.Equal(t, id, deliver(id).ContainerID)
	require.Equal(t, "no-such-id", deliver("no-such-id").ContainerID)
	require.InDelta(t, 2, testutil.ToFloat64(b.exits.WithLabelValues("settled")), 0)
	require.InDelta(t, 1, testutil.ToFloat64(b.exits.WithLabelValues("unsettled")), 0)
	mfs, err := reg.Gather()
	require.NoError(t, err)
	var observed uint64
	for _, mf := range mfs {
		if mf.GetName() == "tether_containerd_exit_settle_seconds" {
			observed = mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	require.Equal(t, uint64(3), observed, "every delivered exit's wait is observed")
}
