package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	cloudvm "github.com/tetheredge/tether/cloudcore/vm"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/vmguest"
)

// marks keeps the time and attributes of the log records named in msgs
// (CloudCore's and EdgeCore's: one process, one clock) and passes every
// record on to next.
type marks struct {
	next  slog.Handler
	msgs  map[string]bool
	mu    *sync.Mutex
	seen  *[]mark
	attrs []slog.Attr
}

// mark is one kept log record.
type mark struct {
	msg   string
	at    time.Time
	attrs map[string]slog.Value
}

func newMarks(msgs ...string) marks {
	m := marks{next: slog.DiscardHandler, msgs: map[string]bool{}, mu: &sync.Mutex{}, seen: &[]mark{}}
	for _, s := range msgs {
		m.msgs[s] = true
	}
	return m
}

func (h marks) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || h.next.Enabled(ctx, l)
}

func (h marks) Handle(ctx context.Context, r slog.Record) error {
	if h.msgs[r.Message] {
		k := mark{msg: r.Message, at: r.Time, attrs: map[string]slog.Value{}}
		for _, a := range h.attrs {
			k.attrs[a.Key] = a.Value
		}
		r.Attrs(func(a slog.Attr) bool {
			k.attrs[a.Key] = a.Value
			return true
		})
		h.mu.Lock()
		*h.seen = append(*h.seen, k)
		h.mu.Unlock()
	}
	if !h.next.Enabled(ctx, r.Level) {
		return nil
	}
	return h.next.Handle(ctx, r)
}

func (h marks) WithAttrs(as []slog.Attr) slog.Handler {
	h.next = h.next.WithAttrs(as)
	h.attrs = append(slices.Clip(h.attrs), as...)
	return h
}

func (h marks) WithGroup(name string) slog.Handler {
	h.next = h.next.WithGroup(name)
	return h
}

// find returns the last kept record msg whose attribute key is val.
func (h marks) find(tb testing.TB, msg, key, val string) mark {
	tb.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	for i := len(*h.seen) - 1; i >= 0; i-- {
		if k := (*h.seen)[i]; k.msg == msg && k.attrs[key].String() == val {
			return k
		}
	}
	tb.Fatalf("no log record %q with %s=%s", msg, key, val)
	return mark{}
}

// BenchmarkVMCreateToBoot: a VirtualMachine created in the API server to
// its boot marker, one VM at a time (1 vCPU, 128Mi, no hugepages, shared
// CPUs), through CloudCore, the tunnel, EdgeCore and the shim to a real
// QEMU (TCG here), split into:
//
//	tether:    VM created -> QEMU exec'd, the sum of
//	  controller:  VM created -> its pod created (the controller's log,
//	               after the API server answered the pod's create)
//	  sync:        pod created -> the pod in the edge's store (a store
//	               subscriber's call: CloudCore's sync, tunnel, SQLite)
//	  podmgr:      in the store -> RunPodSandbox begins (the backend's
//	               record: createdAt): pod manager, shim
//	  runp:        RunPodSandbox (the backend: the VM's record in SQLite,
//	               its claim of resources; the rest is checks and mkdir)
//	  podmgr2:     RunPodSandbox returned -> CreateContainer begins
//	  create:      CreateContainer, itself split into
//	    overlay:     the VM's qcow2 overlay
//	    seedspec:    the NoCloud seed (none here) and the QEMU spec
//	    record:      the container's record in SQLite
//	  start:       CreateContainer returned -> QEMU exec (startedAt)
//	qemu:      exec -> QMP ready, vCPUs pinned, cont (the backend's qemu_start)
//	boot:      cont -> the boot marker seen on the console (polled every 50 ms)
//	status:    marker seen -> the VM's status Running, read from the API
//	total:     VM created -> status Running
//
// The VMs alternate between the two ways their disk is made: from the
// backend's overlay pool (its pool filled, the default) and by qemu-img
// on the create path (the pool emptied just before the VM is created: the
// path as it was before the pool, plus one read of an empty directory).
// Each sample is filed by what the backend counted (a pool hit or a
// miss), and each part is reported per way, e.g. ms-p50-tether-pool and
// ms-p50-tether-qemuimg. Run with an even -benchtime (20x: 10 each).
//
// The edge times come from the VM backend's record (createdAt,
// startedAt, bootedAt, wall-clock nanoseconds) and the log records of
// CloudCore and EdgeCore; the process is one, so the clocks are one.
// Each VM is deleted (and its rows gone) before the next, off the clock.
func BenchmarkVMCreateToBoot(b *testing.B) {
	mk := newMarks("vm pod created", "vm sandbox created", "vm container created", "vm started")
	x := startVMSite(b, "vm-bench", "", slog.New(mk))
	var storeMu sync.Mutex
	inStore := map[string]time.Time{} // pod name -> first seen in the edge store
	b.Cleanup(x.edge.st.Subscribe(func(keys []objsync.Key) {
		now := time.Now()
		storeMu.Lock()
		defer storeMu.Unlock()
		for _, k := range keys {
			if _, ok := inStore[k.Name]; k.Kind == "Pod" && k.Group == "" && !ok {
				inStore[k.Name] = now
			}
		}
	}))
	ctx := context.Background()
	parts := []string{"tether", "controller", "sync", "podmgr", "runp", "podmgr2", "create", "overlay", "seedspec", "record",
		"start", "qemu", "boot", "status", "total"}
	samples := map[string][]time.Duration{}
	img, err := x.images.Get(vmguest.ImageName)
	require.NoError(b, err)
	pool := filepath.Join(x.images.Dir(), img.Name, "overlays")
	hits := func() float64 {
		return promtest.Sum(b, x.edge.reg, "tether_vm_overlay_pool_total", map[string]string{"result": "hit"})
	}
	for i := 0; b.Loop(); i++ {
		name := fmt.Sprintf("bench-%d", i)
		b.StopTimer()
		require.Eventually(b, func() bool {
			n, err := x.images.PooledOverlays(img)
			return err == nil && n == vm.DefaultOverlayPool
		}, 3*time.Minute, 20*time.Millisecond, "the pool is full again")
		if i%2 == 1 {
			require.NoError(b, os.RemoveAll(pool)) // this VM's disk by qemu-img
		}
		hit0 := hits()
		b.StartTimer()
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
			CreatedAt  int64 `json:"createdAt"`
			Containers []struct {
				StartedAt int64 `json:"startedAt"`
				BootedAt  int64 `json:"bootedAt"`
			} `json:"containers"`
		}
		require.NoError(b, json.Unmarshal(rows[0].Detail, &rec))
		require.Len(b, rec.Containers, 1)
		c := rec.Containers[0]
		require.NotZero(b, c.BootedAt)
		sb, pod := rows[0].Owner, cloudvm.PodName(name)
		podCreated := mk.find(b, "vm pod created", "pod", pod).at
		storeMu.Lock()
		stored, ok := inStore[pod]
		storeMu.Unlock()
		require.True(b, ok, "the pod reached the edge's store")
		runpEnd := mk.find(b, "vm sandbox created", "sandbox", sb).at
		cc := mk.find(b, "vm container created", "sandbox", sb)
		took := mk.find(b, "vm started", "sandbox", sb).attrs["qemu_start"].Duration()
		require.Positive(b, took, "the backend logged the QEMU start")
		runpBegin, exec, booted := time.Unix(0, rec.CreatedAt), time.Unix(0, c.StartedAt), time.Unix(0, c.BootedAt)
		createBegin := cc.at.Add(-cc.attrs["took"].Duration())
		way := "qemuimg"
		if hits() > hit0 {
			way = "pool"
		}
		for part, d := range map[string]time.Duration{
			"tether": exec.Sub(t0), "controller": podCreated.Sub(t0), "sync": stored.Sub(podCreated),
			"podmgr": runpBegin.Sub(stored), "runp": runpEnd.Sub(runpBegin), "podmgr2": createBegin.Sub(runpEnd),
			"create": cc.attrs["took"].Duration(), "overlay": cc.attrs["overlay_time"].Duration(),
			"seedspec": cc.attrs["seed_spec_time"].Duration(), "record": cc.attrs["record_time"].Duration(),
			"start": exec.Sub(cc.at), "qemu": took, "boot": booted.Sub(exec.Add(took)), "status": t4.Sub(booted),
			"total": t4.Sub(t0),
		} {
			samples[part+"-"+way] = append(samples[part+"-"+way], d)
		}

		require.NoError(b, x.vms.Delete(ctx, x.ns, name))
		require.Eventually(b, func() bool {
			all, err := x.edge.st.Allocations().Kind(context.Background(), "")
			return err == nil && len(all) == 0
		}, 3*time.Minute, 20*time.Millisecond, "VM %s released", name)
		b.StartTimer()
	}
	for _, way := range []string{"pool", "qemuimg"} {
		for _, part := range parts {
			d := samples[part+"-"+way]
			b.ReportMetric(float64(p50(d).Microseconds())/1000, "ms-p50-"+part+"-"+way)
			b.Logf("%s %s: p50 %v, samples %s", way, part, p50(d), fmtDurations(d))
		}
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
