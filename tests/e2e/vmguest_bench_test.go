package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	cloudvm "github.com/tetheredge/tether/cloudcore/vm"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/tests/vmguest"
)

// qemuStarts keeps the qemu_start attribute of the VM backend's "vm
// started" log records (exec of QEMU to QMP ready, vCPUs pinned, cont),
// by sandbox, and passes every record on to next.
type qemuStarts struct {
	next  slog.Handler
	mu    *sync.Mutex
	took  map[string]time.Duration
	attrs []slog.Attr
}

func (h qemuStarts) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || h.next.Enabled(ctx, l)
}

func (h qemuStarts) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "vm started" {
		var sandbox string
		var took time.Duration
		for _, a := range h.attrs {
			if a.Key == "sandbox" {
				sandbox = a.Value.String()
			}
		}
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "sandbox":
				sandbox = a.Value.String()
			case "qemu_start":
				took = a.Value.Duration()
			}
			return true
		})
		if sandbox != "" && took > 0 {
			h.mu.Lock()
			h.took[sandbox] = took
			h.mu.Unlock()
		}
	}
	if !h.next.Enabled(ctx, r.Level) {
		return nil
	}
	return h.next.Handle(ctx, r)
}

func (h qemuStarts) WithAttrs(as []slog.Attr) slog.Handler {
	h.next = h.next.WithAttrs(as)
	h.attrs = append(slices.Clip(h.attrs), as...)
	return h
}

func (h qemuStarts) WithGroup(name string) slog.Handler {
	h.next = h.next.WithGroup(name)
	return h
}

// BenchmarkVMCreateToBoot: a VirtualMachine created in the API server to
// its boot marker, one VM at a time (1 vCPU, 128Mi, no hugepages, shared
// CPUs), through CloudCore, the tunnel, EdgeCore and the shim to a real
// QEMU (TCG here), split into:
//
//	tether:    VM created -> QEMU exec'd (controller, pod, tunnel, store,
//	           pod manager, shim, backend: record, overlay, spec)
//	qemu:      exec -> QMP ready, vCPUs pinned, cont (the backend's qemu_start)
//	boot:      cont -> the boot marker seen on the console (polled every 50 ms)
//	status:    marker seen -> the VM's status Running, read from the API
//	total:     VM created -> status Running
//
// The edge times come from the VM backend's record (startedAt, bootedAt,
// wall-clock nanoseconds) and its log; the process is one, so the clocks
// are one. Each VM is deleted (and its rows gone) before the next, off
// the clock.
func BenchmarkVMCreateToBoot(b *testing.B) {
	starts := qemuStarts{next: slog.DiscardHandler, mu: &sync.Mutex{}, took: map[string]time.Duration{}}
	x := startVMSite(b, "vm-bench", "", slog.New(starts))
	ctx := context.Background()
	var tether, qemuStart, boot, status, total []time.Duration
	for i := 0; b.Loop(); i++ {
		name := fmt.Sprintf("bench-%d", i)
		t0 := time.Now()
		_, err := x.vms.Create(ctx, &cloudvm.VirtualMachine{
			ObjectMeta: metav1.ObjectMeta{Namespace: x.ns, Name: name},
			Spec:       cloudvm.Spec{Image: vmguest.ImageName, VCPUs: 1, Memory: "128Mi", NodeName: x.node},
		})
		require.NoError(b, err)
		for {
			v, err := x.vms.Get(ctx, x.ns, name)
			require.NoError(b, err)
			if v.Status.Phase == cloudvm.PhaseRunning {
				break
			}
			require.NotEqual(b, cloudvm.PhaseFailed, v.Status.Phase, "%+v", v.Status)
			require.Less(b, time.Since(t0), 4*time.Minute, "VM %s did not boot: %+v", name, v.Status)
			time.Sleep(5 * time.Millisecond) // polling the API server as a client would
		}
		t4 := time.Now()
		b.StopTimer()
		rows, err := x.edge.st.Allocations().Kind(ctx, vm.KindVM)
		require.NoError(b, err)
		require.Len(b, rows, 1)
		var rec struct {
			Containers []struct {
				StartedAt int64 `json:"startedAt"`
				BootedAt  int64 `json:"bootedAt"`
			} `json:"containers"`
		}
		require.NoError(b, json.Unmarshal(rows[0].Detail, &rec))
		require.Len(b, rec.Containers, 1)
		c := rec.Containers[0]
		require.NotZero(b, c.BootedAt)
		starts.mu.Lock()
		took := starts.took[rows[0].Owner]
		starts.mu.Unlock()
		require.Positive(b, took, "the backend logged the QEMU start")
		exec, booted := time.Unix(0, c.StartedAt), time.Unix(0, c.BootedAt)
		tether = append(tether, exec.Sub(t0))
		qemuStart = append(qemuStart, took)
		boot = append(boot, booted.Sub(exec.Add(took)))
		status = append(status, t4.Sub(booted))
		total = append(total, t4.Sub(t0))

		require.NoError(b, x.vms.Delete(ctx, x.ns, name))
		require.Eventually(b, func() bool {
			all, err := x.edge.st.Allocations().Kind(context.Background(), "")
			return err == nil && len(all) == 0
		}, 3*time.Minute, 20*time.Millisecond, "VM %s released", name)
		b.StartTimer()
	}
	for _, m := range []struct {
		name string
		d    []time.Duration
	}{{"tether", tether}, {"qemu", qemuStart}, {"boot", boot}, {"status", status}, {"total", total}} {
		b.ReportMetric(float64(p50(m.d).Microseconds())/1000, "ms-p50-"+m.name)
		b.Logf("%s: p50 %v, samples %s", m.name, p50(m.d), fmtDurations(m.d))
	}
	b.Logf("acceleration %s", vmguest.Accel(b))
}

// p50 is the median of d.
func p50(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

func fmtDurations(d []time.Duration) string {
	out := make([]string, len(d))
	for i, x := range d {
		out[i] = x.Round(100 * time.Microsecond).String()
	}
	return strings.Join(out, " ")
}
