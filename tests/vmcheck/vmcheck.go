// Package vmcheck reads what a running VM holds of the host, for tests:
// the QEMU pid in the VM backend's record and the CPU affinity of its
// threads.
package vmcheck

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qemu"
	"github.com/tetheredge/tether/edgecore/store"
)

// record is the part of the VM backend's record (kind "vm") read here.
type record struct {
	Containers []struct {
		State string `json:"state"`
		Pid   int    `json:"pid"`
	} `json:"containers"`
}

// TheVM is the one VM sandbox in the allocation table and the pid of its
// running QEMU.
func TheVM(ctx context.Context, tb testing.TB, a store.Allocations) (sandbox string, pid int) {
	tb.Helper()
	rows, err := a.Kind(ctx, vm.KindVM)
	require.NoError(tb, err)
	require.Len(tb, rows, 1)
	var rec record
	require.NoError(tb, json.Unmarshal(rows[0].Detail, &rec))
	for _, c := range rec.Containers {
		if c.Pid != 0 && c.State == "running" {
			pid = c.Pid
		}
	}
	require.NotZero(tb, pid, "a running QEMU in the record %s", rows[0].Detail)
	return rows[0].Owner, pid
}

// RequirePinned checks every thread of QEMU pid: the vCPU threads ("CPU
// n/TCG" or "CPU n/KVM") each on its own dedicated core of g, every other
// thread on g's shared set.
func RequirePinned(tb testing.TB, pid int, g resources.Grant) {
	tb.Helper()
	tids, err := qemu.Threads(pid)
	require.NoError(tb, err)
	shared := make([]string, len(g.SharedCPUs))
	for i, c := range g.SharedCPUs {
		shared[i] = strconv.Itoa(c)
	}
	seen := map[string]bool{}
	vcpus := 0
	for _, tid := range tids {
		comm := strings.TrimSpace(readProc(tb, pid, tid, "comm"))
		allowed := ""
		for line := range strings.SplitSeq(readProc(tb, pid, tid, "status"), "\n") {
			if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
				allowed = strings.TrimSpace(v)
			}
		}
		var idx int
		if _, err := fmt.Sscanf(comm, "CPU %d/", &idx); err == nil {
			vcpus++
			require.Less(tb, idx, len(g.CPUs), "vCPU thread %d (%s) beyond the grant", tid, comm)
			require.Equal(tb, strconv.Itoa(g.CPUs[idx]), allowed, "vCPU thread %d (%s)", tid, comm)
			require.False(tb, seen[allowed], "vCPU %d shares core %s", idx, allowed)
			seen[allowed] = true
			continue
		}
		require.Equal(tb, strings.Join(shared, ","), allowed, "emulator thread %d (%s) on the shared set", tid, comm)
	}
	require.Equal(tb, len(g.CPUs), vcpus, "one thread per vCPU")
}

func readProc(tb testing.TB, pid, tid int, name string) string {
	tb.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/%s", pid, tid, name))
	require.NoError(tb, err)
	return string(data)
}
