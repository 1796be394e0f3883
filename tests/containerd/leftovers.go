package containerd

// What a host leaves behind when its teardown is not orderly, and how it is
// found:
//
//   - processes: containerd, its shims and runc name Dir or Socket on their
//     command line; the containers' processes are those the CRI reported,
//     and every process in the cgroups of a container still in runc's state
//     directory (Dir/runc, which survives containerd and the shims). A pid
//     is checked with its start time against reuse.
//   - cgroups of containers runc never deleted (removed once empty);
//   - mounts under Dir: overlay rootfs, sandbox /dev/shm, and, since
//     netns_mounts_under_state_dir is set, the pods' network namespaces.
//
// A test binary killed outright (go test's -timeout panic, SIGKILL) runs no
// cleanup: containerd dies with it (Pdeathsig) but shims and containers
// survive, and /tmp/tether-ctrd-* stays, until the next Start reaps it
// (stale.go).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// proc identifies a process across pid reuse.
type proc struct {
	pid   int
	start uint64 // clock ticks since boot, field 22 of /proc/<pid>/stat
}

func procOf(pid int) (proc, bool) {
	start, ok := startTime(pid)
	return proc{pid: pid, start: start}, ok
}

func (p proc) alive() bool {
	start, ok := startTime(p.pid)
	return ok && start == p.start
}

func startTime(pid int) (uint64, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	fields := strings.Fields(s[i+1:])
	// A zombie (state Z) has ended: it waits to be reaped by its parent,
	// often PID 1 for a shim, which may take its time.
	if len(fields) < 20 || fields[0] == "Z" {
		return 0, false
	}
	v, err := strconv.ParseUint(fields[19], 10, 64) // field 22 overall
	if err != nil {
		return 0, false
	}
	return v, true
}

// verbosePid reads "pid" from the CRI's verbose info.
func verbosePid(info map[string]string) int {
	var v struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal([]byte(info["info"]), &v); err != nil {
		return 0
	}
	return v.Pid
}

func (h *Host) containerProc(ctx context.Context, id string) []proc {
	resp, err := h.Runtime.ContainerStatus(ctx, id, true)
	if err != nil {
		return nil
	}
	return livingProc(verbosePid(resp.GetInfo()))
}

func (h *Host) sandboxProc(ctx context.Context, id string) []proc {
	resp, err := h.Runtime.PodSandboxStatus(ctx, id, true)
	if err != nil {
		return nil
	}
	return livingProc(verbosePid(resp.GetInfo()))
}

func livingProc(pid int) []proc {
	if pid <= 0 {
		return nil
	}
	if p, ok := procOf(pid); ok {
		return []proc{p}
	}
	return nil
}

// runcState is the part of runc's state.json (libcontainer.State) read
// here.
type runcState struct {
	ID          string            `json:"id"`
	InitPid     int               `json:"init_process_pid"`
	InitStart   uint64            `json:"init_process_start"`
	CgroupPaths map[string]string `json:"cgroup_paths"`
}

// runcStates reads the containers runc still knows under root
// (root/<namespace>/<id>/state.json).
func runcStates(root string) []runcState {
	files, _ := filepath.Glob(filepath.Join(root, "*", "*", "state.json"))
	var states []runcState
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var st runcState
		if json.Unmarshal(b, &st) == nil {
			states = append(states, st)
		}
	}
	return states
}

// statePids returns the processes of the containers in states: the init
// process and every member of their cgroups.
func statePids(states []runcState) []proc {
	var procs []proc
	for _, st := range states {
		if st.InitPid > 0 {
			procs = append(procs, proc{pid: st.InitPid, start: st.InitStart})
		}
		for _, path := range st.CgroupPaths {
			b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					procs = append(procs, livingProc(pid)...)
				}
			}
		}
	}
	return procs
}

// processes returns the processes of this host still alive: any whose
// command line names Dir (containerd, shims, runc), those of owned, and
// those of containers in runc's state directory.
func (h *Host) processes(owned []proc) []proc {
	var left []proc
	seen := map[int]bool{}
	for _, p := range append(owned, statePids(runcStates(h.runcRoot()))...) {
		if !seen[p.pid] && p.alive() {
			left = append(left, p)
			seen[p.pid] = true
		}
	}
	entries, _ := os.ReadDir("/proc") // always readable on Linux
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || seen[pid] || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), h.Dir) {
			continue
		}
		if p, ok := procOf(pid); ok {
			left = append(left, p)
		}
	}
	return left
}

// Mounts returns the mount points under dir, deepest first, from
// /proc/self/mountinfo. tests/cmd/quickstart checks its own directory with
// it.
func Mounts(dir string) ([]string, error) { return mounts(dir) }

// mounts returns the mount points under dir, deepest first.
func mounts(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	var found []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			found = append(found, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	sort.Slice(found, func(i, j int) bool { return len(found[i]) > len(found[j]) })
	return found, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// reapLeftovers waits up to grace for the host's processes to end (shims
// exit just after their task is deleted), kills what remains, removes the
// cgroups and unmounts what is still mounted under Dir, and reports it all.
func (h *Host) reapLeftovers(owned []proc, grace time.Duration) error {
	var errs []error
	left := h.waitGone(owned, grace)
	if len(left) > 0 {
		var pids []string
		for _, p := range left {
			pids = append(pids, describe(p.pid))
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
		errs = append(errs, fmt.Errorf("processes left after teardown, killed: %s", strings.Join(pids, "; ")))
		if left = h.waitGone(left, 5*time.Second); len(left) > 0 {
			errs = append(errs, fmt.Errorf("processes survive SIGKILL: %v", left))
		}
	}
	var cgroups []string
	for _, st := range runcStates(h.runcRoot()) {
		for _, path := range st.CgroupPaths {
			if err := os.Remove(path); err == nil || !errors.Is(err, os.ErrNotExist) {
				cgroups = append(cgroups, path)
			}
		}
	}
	if len(cgroups) > 0 {
		sort.Strings(cgroups)
		errs = append(errs, fmt.Errorf("cgroups left after teardown, removed where empty: %s", strings.Join(cgroups, ", ")))
	}
	mps, err := mounts(h.Dir)
	if err != nil {
		errs = append(errs, err)
	}
	if len(mps) > 0 {
		for _, mp := range mps {
			if err := unix.Unmount(mp, 0); err != nil {
				_ = unix.Unmount(mp, unix.MNT_DETACH)
			}
		}
		errs = append(errs, fmt.Errorf("mounts left after teardown, unmounted: %s", strings.Join(mps, ", ")))
	}
	return errors.Join(errs...)
}

// waitGone polls /proc (there is no exit notification for processes that
// are not our children) until none of the host's processes (see processes)
// is alive or timeout passes, and returns those still alive.
func (h *Host) waitGone(owned []proc, timeout time.Duration) []proc {
	left := h.processes(owned)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(timeout)
	for len(left) > 0 {
		select {
		case <-tick.C:
			left = h.processes(owned)
		case <-deadline:
			return left
		}
	}
	return nil
}

func (h *Host) runcRoot() string { return filepath.Join(h.Dir, "runc") }

func describe(pid int) string {
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return fmt.Sprintf("%d %s", pid, strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " ")))
}
