package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// lockDir takes an exclusive flock on dir/.lock for the quickstart's life:
// a second quickstart on the same directory is refused, and one that finds
// the lock free knows that whatever a previous one left there is stale.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another quickstart runs in %s (stop it with Ctrl-C first)", dir)
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return f, nil
}

// qemusUnder returns the pids of the QEMUs whose command line names a file
// under dir (the VM backend's run directory: overlays and QMP sockets).
// QEMU runs in a session of its own and outlives EdgeCore.
func qemusUnder(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := bytes.Split(raw, []byte{0})
		if len(args) == 0 || !strings.HasPrefix(filepath.Base(string(args[0])), "qemu-system") {
			continue
		}
		if bytes.Contains(raw, []byte(dir+"/")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killQEMUs kills the QEMUs under dir and waits (bounded) until they are
// gone; it returns the pids it killed.
func killQEMUs(dir string) []int {
	pids := qemusUnder(dir)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(qemusUnder(dir)) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // polling /proc for exits of processes that are not our children
	}
	return pids
}

// mountsUnder returns the mount points below any of dirs, deepest first,
// from /proc/self/mountinfo.
func mountsUnder(dirs ...string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		for _, d := range dirs {
			if mp == d || strings.HasPrefix(mp, d+"/") {
				out = append(out, mp)
				break
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i] // later mounts sit on earlier ones
	}
	return out, nil
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

// sweep removes what an orderly stop should not have left under dirs:
// QEMUs in vmRunDir and mounts. It returns an error naming each, so a leak
// is reported, never hidden.
func sweep(vmRunDir string, dirs ...string) error {
	var errs []error
	if pids := killQEMUs(vmRunDir); len(pids) > 0 {
		errs = append(errs, fmt.Errorf("killed QEMU %v left running in %s", pids, vmRunDir))
	}
	mounts, err := mountsUnder(dirs...)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, m := range mounts {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s left mounted: %w", m, err))
			continue
		}
		errs = append(errs, fmt.Errorf("unmounted %s, left mounted", m))
	}
	return errors.Join(errs...)
}
