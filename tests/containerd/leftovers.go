package containerd

// What a host leaves behind when its teardown is not orderly, and how it is
// found: processes (containerd, its shims and runc name Dir or Socket on
// their command line; the containers' own processes are known by the pids
// the CRI reported, checked with their start time against pid reuse) and
// mounts under Dir (overlay rootfs, sandbox /dev/shm, and, since
// netns_mounts_under_state_dir is set, the pods' network namespaces).
//
// A test binary killed outright (go test's -timeout panic, SIGKILL) runs no
// cleanup: containerd dies with it (Pdeathsig) but shims and containers
// survive, and /tmp/tether-ctrd-* stays. A later host cannot tell those from
// a live host of another test binary, so it does not touch them.

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

// Processes returns the processes of this host still alive: any whose
// command line names Dir (containerd, shims, runc) and those of owned.
func (h *Host) processes(owned []proc) []proc {
	var left []proc
	seen := map[int]bool{}
	for _, p := range owned {
		if p.alive() {
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

// reapLeftovers waits briefly for the host's processes to end (shims exit
// just after their task is deleted), kills what remains, unmounts what is
// still mounted under Dir, and reports both.
func (h *Host) reapLeftovers(owned []proc) error {
	var errs []error
	// Polling /proc: there is no exit notification for non-children.
	left := h.processes(owned)
	tick := time.NewTicker(20 * time.Millisecond)
	deadline := time.After(5 * time.Second)
	for wait := true; wait && len(left) > 0; {
		select {
		case <-tick.C:
			left = h.processes(owned)
		case <-deadline:
			wait = false
		}
	}
	tick.Stop()
	if len(left) > 0 {
		var pids []string
		for _, p := range left {
			pids = append(pids, describe(p.pid))
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
		errs = append(errs, fmt.Errorf("processes left after teardown, killed: %s", strings.Join(pids, "; ")))
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

func describe(pid int) string {
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return fmt.Sprintf("%d %s", pid, strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " ")))
}
