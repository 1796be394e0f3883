package app_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qemu"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/hugepages"
	"github.com/tetheredge/tether/tests/vmguest"
)

// vmRecord is the part of the VM backend's record (kind "vm") this test
// reads: the QEMU pid of the live container.
type vmRecord struct {
	Containers []struct {
		State string `json:"state"`
		Pid   int    `json:"pid"`
	} `json:"containers"`
}

// theVM is the one VM sandbox in a's store and its QEMU pid.
func theVM(ctx context.Context, t *testing.T, a *app.App) (sandbox string, pid int) {
	t.Helper()
	rows, err := a.Store().Allocations().Kind(ctx, vm.KindVM)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	var rec vmRecord
	require.NoError(t, json.Unmarshal(rows[0].Detail, &rec))
	for _, c := range rec.Containers {
		if c.Pid != 0 && c.State == "running" {
			pid = c.Pid
		}
	}
	require.NotZero(t, pid, "a running QEMU in the record %s", rows[0].Detail)
	return rows[0].Owner, pid
}

// poolRows are owner's rows other than the VM record.
func poolRows(ctx context.Context, t *testing.T, a *app.App, owner string) []store.Allocation {
	t.Helper()
	rows, err := a.Store().Allocations().Owner(ctx, owner)
	require.NoError(t, err)
	var out []store.Allocation
	for _, r := range rows {
		if r.Kind != vm.KindVM {
			out = append(out, r)
		}
	}
	return out
}

// requirePinned checks every thread of QEMU pid: the vCPU threads ("CPU
// n/TCG" or "CPU n/KVM") each on its own dedicated core of g, every other
// thread on g's shared set.
func requirePinned(t *testing.T, pid int, g resources.Grant) {
	t.Helper()
	tids, err := qemu.Threads(pid)
	require.NoError(t, err)
	shared := make([]string, len(g.SharedCPUs))
	for i, c := range g.SharedCPUs {
		shared[i] = strconv.Itoa(c)
	}
	seen := map[string]bool{}
	vcpus := 0
	for _, tid := range tids {
		comm := strings.TrimSpace(readProc(t, pid, tid, "comm"))
		allowed := ""
		for line := range strings.SplitSeq(readProc(t, pid, tid, "status"), "\n") {
			if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
				allowed = strings.TrimSpace(v)
			}
		}
		var idx int
		if _, err := fmt.Sscanf(comm, "CPU %d/", &idx); err == nil {
			vcpus++
			require.Equal(t, strconv.Itoa(g.CPUs[idx]), allowed, "vCPU thread %d (%s)", tid, comm)
			require.False(t, seen[allowed], "vCPU %d shares core %s", idx, allowed)
			seen[allowed] = true
			continue
		}
		require.Equal(t, strings.Join(shared, ","), allowed, "emulator thread %d (%s) on the shared set", tid, comm)
	}
	require.Equal(t, len(g.CPUs), vcpus, "one thread per vCPU")
}

func readProc(t *testing.T, pid, tid int, name string) string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/%s", pid, tid, name))
	require.NoError(t, err)
	return string(data)
}

// A VM pod with dedicated CPUs and 2Mi hugepages through EdgeCore's
// wiring with a resource pool (Config.Resources): the backend gets its
// core and its hugetlbfs mount from the pool, the vCPU thread runs on the
// granted core alone and the emulator threads on the shared set, the
// guest's RAM comes out of HugePages_Free. EdgeCore stopped and started
// again on the same store adopts the QEMU and finds the same grant
// (Lookup, rows unchanged, the held core not given again). Deleting the
// pod gives everything back: no rows, no QEMU, the pages free again.
func TestVMPoolDedicatedCPUsAndHugepages(t *testing.T) {
	h := containerd.Start(t)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 5*time.Minute)
	defer cancel()
	mnt := hugepages.Reserve(t, 64+8) // the guest's 128Mi and a little more
	cfg := config(t)
	images, err := vm.OpenImages(filepath.Join(cfg.DataDir, "vm-images"), "")
	require.NoError(t, err)
	vmguest.Import(t, images)
	runDir := vmguest.RunDir(t)
	cfg.CRI = app.CRIConfig{
		Listen: filepath.Join(runDir, "cri.sock"), Containerd: h.Endpoint(),
		VM: &app.VMConfig{RunDir: runDir, Accel: vmguest.Accel(t)},
	}
	cfg.Pods = pods.Config{LogDir: filepath.Join(t.TempDir(), "logs")}
	cfg.Resources = &resources.Config{HugepageMounts: map[int64]string{resources.Hugepage2Mi: mnt}}
	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	closed := false
	defer func() {
		if !closed {
			require.NoError(t, a.Close())
		}
	}()
	free := hugepages.Free(t)
	pod := vmPod("pinned")
	pod.Annotations[vm.AnnotationDedicatedCPUs] = "true"
	pod.Annotations[vm.AnnotationHugepageSize] = "2Mi"
	putPod(ctx, t, a, pod)
	stop := run(ctx, t, a)
	booted := func(a *app.App) {
		require.Eventually(t, func() bool {
			st, ok := podStatus(ctx, a, string(pod.UID))
			c := podCondition(st, pods.ConditionGuestBooted)
			return ok && st.Phase == corev1.PodRunning && c != nil && c.Status == corev1.ConditionTrue
		}, 3*time.Minute, 100*time.Millisecond, "Running with GuestBooted")
	}
	booted(a)

	sb, pid := theVM(ctx, t, a)
	g, ok, err := a.Pool().Lookup(ctx, sb)
	require.NoError(t, err)
	require.True(t, ok, "the pool holds the VM's grant")
	require.Len(t, g.CPUs, 1)
	require.NotContains(t, g.SharedCPUs, g.CPUs[0])
	require.Equal(t, mnt, g.HugepageDir)
	requirePinned(t, pid, g)
	require.LessOrEqual(t, hugepages.Free(t), free-64, "the guest's 128Mi come from hugepages")
	rows := poolRows(ctx, t, a, sb)
	require.NotEmpty(t, rows)

	// EdgeCore goes and comes back on the same store: the VM backend
	// leaves QEMU running, the new one adopts it.
	stop()
	require.NoError(t, a.Close())
	closed = true
	a, err = app.New(ctx, cfg)
	require.NoError(t, err)
	closed = false
	stop = run(ctx, t, a)
	defer stop()
	sb2, pid2 := theVM(ctx, t, a)
	require.Equal(t, sb, sb2)
	require.Equal(t, pid, pid2, "the QEMU was adopted, not restarted")
	g2, ok, err := a.Pool().Lookup(ctx, sb)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, g, g2, "the same grant after the restart")
	require.Equal(t, rows, poolRows(ctx, t, a, sb), "the allocation rows are unchanged")
	_, err = a.Pool().Allocate(ctx, resources.Request{Owner: "other", DedicatedCPUs: len(g.CPUs) + len(g.SharedCPUs)})
	require.ErrorIs(t, err, resources.ErrInsufficient, "the VM's core is not given twice")
	requirePinned(t, pid, g)

	require.NoError(t, a.Store().Apply(ctx, []store.Change{{Op: message.OpDelete, Object: store.Object{
		Resource: message.Resource{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name},
	}}}))
	require.Eventually(t, func() bool {
		all, err := a.Store().Allocations().Kind(ctx, "")
		return err == nil && len(all) == 0
	}, 2*time.Minute, 100*time.Millisecond, "the VM's rows go with the pod")
	_, ok, err = a.Pool().Lookup(ctx, sb)
	require.NoError(t, err)
	require.False(t, ok)
	require.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "no QEMU left")
	require.Eventually(t, func() bool { return hugepages.Free(t) >= free }, time.Minute, 50*time.Millisecond,
		"the pages come back")
}
