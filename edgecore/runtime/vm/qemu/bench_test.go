package qemu

import (
	"context"
	"path/filepath"
	"sort"
	"testing"
	"time"

	buildguest "github.com/tetheredge/tether/build/guest"
	"github.com/tetheredge/tether/tests/guest"
)

// BenchmarkBoot starts the test guest (1 vCPU, 128 MiB, the probed
// acceleration) and waits for its boot marker, then stops it with the
// power button. It reports the medians of: start-ms, Start's own time
// (fork/exec, QMP socket up and negotiated, pinning, cont); marker-ms,
// from Start's return to the marker in the serial log (the guest's boot;
// the log is polled every 2 ms); stop-ms, Stop by powerdown until QEMU's
// exit was seen on the pidfd.
func BenchmarkBoot(b *testing.B) {
	g := guest.Build(b)
	r, err := ProbeAccel(context.Background(), ProbeConfig{})
	if err != nil {
		b.Fatal(err)
	}
	var starts, markers, stops []time.Duration
	for i := 0; b.Loop(); i++ {
		dir := b.TempDir()
		spec := Spec{
			Name: guest.Name("bench"), Dir: filepath.Join(dir, "run"), VCPUs: 1, MemoryBytes: 128 << 20,
			Kernel: g.Kernel, Initrd: g.Initrd, Cmdline: g.Cmdline,
			SerialLog: filepath.Join(dir, "serial.log"), Accel: r.Accel,
		}
		t0 := time.Now()
		m, err := Start(b.Context(), spec, Options{})
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		for count(b, spec.SerialLog, buildguest.BootMarker) == 0 {
			select {
			case <-m.Done():
				b.Fatalf("qemu exited before the marker: %s", tail(spec.OutputLog(), 5))
			case <-time.After(2 * time.Millisecond):
			}
		}
		t2 := time.Now()
		how, err := m.Stop(b.Context(), time.Minute)
		if err != nil || how != EndedPowerdown {
			b.Fatalf("stop: %s %v", how, err)
		}
		t3 := time.Now()
		_ = m.Close()
		starts, markers, stops = append(starts, t1.Sub(t0)), append(markers, t2.Sub(t1)), append(stops, t3.Sub(t2))
	}
	b.ReportMetric(median(starts), "start-ms")
	b.ReportMetric(median(markers), "marker-ms")
	b.ReportMetric(median(stops), "stop-ms")
	b.Logf("accel=%s", r.Accel)
}

func median(d []time.Duration) float64 {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return float64(s[len(s)/2]) / float64(time.Millisecond)
}
