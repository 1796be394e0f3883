package containerd_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/tests/containerd"
)

// BenchmarkContainerdRunPod is the runtime baseline (issue 8, section 6):
// straight to containerd through the CRI, RunPodSandbox, CreateContainer and
// StartContainer of busybox (image present) until the container runs. ns/op
// is the time of those three calls; the teardown of each pod is not timed.
// It reports the p50 of each call, which the CRI shim's benchmark compares
// with, in the same run. Sub-benchmarks: a host-network pod, and a pod on
// the CNI bridge (the bridge plugin's ADD is part of RunPodSandbox).
func BenchmarkContainerdRunPod(b *testing.B) {
	h := containerd.Start(b, containerd.WithCNI())
	for _, mode := range []struct {
		name    string
		hostNet bool
	}{{"hostnet", true}, {"bridge", false}} {
		b.Run(mode.name, func(b *testing.B) { benchRunPod(b, h, mode.hostNet) })
	}
}

func benchRunPod(b *testing.B, h *containerd.Host, hostNet bool) {
	ctx := klog.NewContext(context.Background(), logr.Discard()) // cri-client logs through klog
	var runp, create, start, total []time.Duration
	for i := range b.N {
		b.StopTimer()
		name := fmt.Sprintf("bench-%d", i)
		sb := h.PodSandboxConfig(name, hostNet)
		c := h.BusyboxContainer(name, "sleep", "3600")
		b.StartTimer()

		t0 := time.Now()
		podID, err := h.Runtime.RunPodSandbox(ctx, sb, "")
		require.NoError(b, err)
		t1 := time.Now()
		ctrID, err := h.Runtime.CreateContainer(ctx, podID, c, sb)
		require.NoError(b, err)
		t2 := time.Now()
		require.NoError(b, h.Runtime.StartContainer(ctx, ctrID))
		t3 := time.Now()

		b.StopTimer()
		runp, create, start, total = append(runp, t1.Sub(t0)), append(create, t2.Sub(t1)), append(start, t3.Sub(t2)), append(total, t3.Sub(t0))
		st, err := h.Runtime.ContainerStatus(ctx, ctrID, false)
		require.NoError(b, err)
		require.Equal(b, runtimeapi.ContainerState_CONTAINER_RUNNING, st.GetStatus().GetState())
		require.NoError(b, h.Runtime.StopPodSandbox(ctx, podID))
		require.NoError(b, h.Runtime.RemovePodSandbox(ctx, podID))
		b.StartTimer()
	}
	b.ReportMetric(p50ms(runp), "runp-p50-ms")
	b.ReportMetric(p50ms(create), "create-p50-ms")
	b.ReportMetric(p50ms(start), "start-p50-ms")
	b.ReportMetric(p50ms(total), "total-p50-ms")
}

func p50ms(d []time.Duration) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return float64(s[len(s)/2]) / float64(time.Millisecond)
}
