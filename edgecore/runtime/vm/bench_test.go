package vm_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/runtime/vm"
	ctrdhost "github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/vmguest"
)

// BenchmarkCreateToBootMarker measures, per VM, the CRI path from
// RunPodSandbox to the guest's boot marker on its console, through the
// shim with cri-client, one VM after the other, split into:
//
//	tether-ms   RunPodSandbox + CreateContainer: annotations, the record,
//	            the qcow2 overlay (Tether's own path, the shim included)
//	qemu-ms     StartContainer: QEMU spawned, QMP connected, vCPUs pinned,
//	            cont (QEMU's start, and the little of Tether around it)
//	boot-ms     from StartContainer's return to the marker in the log
//	            (the guest's boot; the benchmark polls the file every ms)
//	total-ms    the sum
//
// Each is the median over the iterations (run with -benchtime=10x). The
// acceleration is the probe's (TCG on the project's machine). Teardown is
// not timed.
func BenchmarkCreateToBootMarker(b *testing.B) {
	h := ctrdhost.Start(b)
	e := newEnv(b)
	rt, _ := shim(b, h, e.st, e.backend())
	ctx := quiet(b.Context())
	var tether, qemuStart, boot, total []time.Duration
	for i := 0; b.Loop(); i++ {
		name := fmt.Sprintf("bench-%d", i)
		sbCfg := e.sandbox(name, nil)
		cfg := compute("compute")
		log := filepath.Join(sbCfg.LogDirectory, cfg.LogPath)
		t0 := time.Now()
		sb, err := rt.RunPodSandbox(ctx, sbCfg, "tether-vm")
		require.NoError(b, err)
		id, err := rt.CreateContainer(ctx, sb, cfg, sbCfg)
		require.NoError(b, err)
		t1 := time.Now()
		require.NoError(b, rt.StartContainer(ctx, id))
		t2 := time.Now()
		for vmguest.CountMarker(log, vm.BootMarker) == 0 {
			if time.Since(t2) > 3*time.Minute {
				console, _ := os.ReadFile(log)
				qemuLog, _ := os.ReadFile(filepath.Join(e.cfg.RunDir, sb, "qemu.log"))
				b.Fatalf("VM %d: no boot marker after 3 minutes; console:\n%s\nqemu:\n%s", i, console, qemuLog)
			}
			time.Sleep(time.Millisecond) // polling another process's file: nothing to wait on
		}
		t3 := time.Now()
		tether, qemuStart, boot, total = append(tether, t1.Sub(t0)), append(qemuStart, t2.Sub(t1)), append(boot, t3.Sub(t2)), append(total, t3.Sub(t0))
		b.StopTimer()
		require.NoError(b, rt.StopContainer(ctx, id, 0))
		require.NoError(b, rt.RemoveContainer(ctx, id))
		require.NoError(b, rt.StopPodSandbox(ctx, sb))
		require.NoError(b, rt.RemovePodSandbox(ctx, sb))
		b.StartTimer()
	}
	for _, m := range []struct {
		unit string
		d    []time.Duration
	}{{"tether-ms", tether}, {"qemu-ms", qemuStart}, {"boot-ms", boot}, {"total-ms", total}} {
		b.ReportMetric(float64(median(m.d).Microseconds())/1000, m.unit)
	}
	b.Logf("accel=%s n=%d tether=%v qemu=%v boot=%v", vmguest.Accel(b), len(total), tether, qemuStart, boot)
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
