package main

import (
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

	"github.com/tetheredge/tether/tests/containerd"
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

// sweep removes what an orderly stop should not have left: QEMUs in
// vmRunDir and mounts under dir. It returns an error naming each, so a
// leak is reported, never hidden.
func sweep(vmRunDir, dir string) error {
	var errs []error
	if pids := killQEMUs(vmRunDir); len(pids) > 0 {
		errs = append(errs, fmt.Errorf("killed QEMU %v left running in %s", pids, vmRunDir))
	}
	mounts, err := containerd.Mounts(dir)
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
