package cri_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	internalapi "k8s.io/cri-api/pkg/apis"

	"github.com/tetheredge/tether/tests/containerd"
)

// BenchmarkShimOverhead (issue 8, section 6): RunPodSandbox,
// CreateContainer and StartContainer of a host-network busybox pod, through
// the shim and straight to containerd, alternating in the same run (one pod
// each way per iteration, the order swapped every iteration), both with
// the cri-client a kubelet uses. ns/op covers both pods and their
// teardown; the figures to read are the per-call p50s of each path and
// their differences (shim minus direct, in ms and in %, and the p50 of
// the per-iteration differences).
func BenchmarkShimOverhead(b *testing.B) {
	h := containerd.Start(b)
	s := startShim(b, h, shimOpts{})
	ctx := quiet(b.Context())
	type path struct {
		name                string
		rt                  internalapi.RuntimeService
		runp, create, start []time.Duration
	}
	paths := []*path{{name: "direct", rt: h.Runtime}, {name: "shim", rt: s.Runtime}}
	for i := range b.N {
		order := paths
		if i%2 == 1 {
			order = []*path{paths[1], paths[0]}
		}
		for _, p := range order {
			name := fmt.Sprintf("%s-%d", p.name, i)
			sb := h.PodSandboxConfig(name, true)
			c := h.BusyboxContainer(name, "sleep", "3600")
			t0 := time.Now()
			podID, err := p.rt.RunPodSandbox(ctx, sb, "")
			require.NoError(b, err)
			t1 := time.Now()
			ctrID, err := p.rt.CreateContainer(ctx, podID, c, sb)
			require.NoError(b, err)
			t2 := time.Now()
			require.NoError(b, p.rt.StartContainer(ctx, ctrID))
			t3 := time.Now()
			p.runp, p.create, p.start = append(p.runp, t1.Sub(t0)), append(p.create, t2.Sub(t1)), append(p.start, t3.Sub(t2))
			require.NoError(b, p.rt.StopPodSandbox(ctx, podID))
			require.NoError(b, p.rt.RemovePodSandbox(ctx, podID))
		}
	}
	d, sh := paths[0], paths[1]
	for _, m := range []struct {
		name      string
		direct, s []time.Duration
	}{{"runp", d.runp, sh.runp}, {"create", d.create, sh.create}, {"start", d.start, sh.start}} {
		pd, ps := p50(m.direct), p50(m.s)
		b.ReportMetric(ms(pd), m.name+"-direct-p50-ms")
		b.ReportMetric(ms(ps), m.name+"-shim-p50-ms")
		b.ReportMetric(ms(ps-pd), m.name+"-overhead-ms")
		b.ReportMetric(100*float64(ps-pd)/float64(pd), m.name+"-overhead-%")
		// The p50 of the differences within an iteration: both pods ran
		// seconds apart, so a load change between iterations cancels.
		diff := make([]time.Duration, len(m.s))
		for i := range diff {
			diff[i] = m.s[i] - m.direct[i]
		}
		b.ReportMetric(ms(p50(diff)), m.name+"-paired-overhead-ms")
	}
}

func p50(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkShimHop isolates what the shim adds to one call from what
// containerd spends on it: ContainerStatus of a running container (one id
// map read in the shim) and Version (none), straight to containerd and
// through the shim, alternating, b.N of each per path. Both are cheap in
// containerd, so the difference is the shim's hop, its lookup and its
// interceptor. Reports the p50 per path and the p50 of the paired
// differences.
func BenchmarkShimHop(b *testing.B) {
	h := containerd.Start(b)
	s := startShim(b, h, shimOpts{})
	ctx := quiet(b.Context())
	sb := h.PodSandboxConfig("hop", true)
	podID, err := s.Runtime.RunPodSandbox(ctx, sb, "")
	require.NoError(b, err)
	ctrID, err := s.Runtime.CreateContainer(ctx, podID, h.BusyboxContainer("hop", "sleep", "3600"), sb)
	require.NoError(b, err)
	require.NoError(b, s.Runtime.StartContainer(ctx, ctrID))
	calls := []struct {
		name string
		call func(rt internalapi.RuntimeService) error
	}{
		{"status", func(rt internalapi.RuntimeService) error { _, err := rt.ContainerStatus(ctx, ctrID, false); return err }},
		{"version", func(rt internalapi.RuntimeService) error { _, err := rt.Version(ctx, "v1"); return err }},
	}
	b.ResetTimer()
	for _, c := range calls {
		var direct, shim, diff []time.Duration
		for i := range b.N {
			var d, s2 time.Duration
			for j, rt := range []internalapi.RuntimeService{h.Runtime, s.Runtime} {
				if i%2 == 1 {
					j = 1 - j // swap the order every iteration
					rt = []internalapi.RuntimeService{h.Runtime, s.Runtime}[j]
				}
				t0 := time.Now()
				require.NoError(b, c.call(rt))
				if j == 0 {
					d = time.Since(t0)
				} else {
					s2 = time.Since(t0)
				}
			}
			direct, shim, diff = append(direct, d), append(shim, s2), append(diff, s2-d)
		}
		b.ReportMetric(ms(p50(direct)), c.name+"-direct-p50-ms")
		b.ReportMetric(ms(p50(shim)), c.name+"-shim-p50-ms")
		b.ReportMetric(ms(p50(diff)), c.name+"-paired-overhead-ms")
	}
	b.StopTimer()
	require.NoError(b, s.Runtime.StopPodSandbox(ctx, podID))
	require.NoError(b, s.Runtime.RemovePodSandbox(ctx, podID))
}
