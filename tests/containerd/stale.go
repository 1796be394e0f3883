package containerd

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// A host's directory is owned through an flock on Dir/owner.lock, held by
// the test binary for the host's life. The kernel drops it when the binary
// dies, however it dies, so a directory whose lock can be taken belongs to
// a test binary that was killed before its cleanup (go test -timeout,
// SIGKILL): its shims, containers, mounts and cgroups are left over, and
// the next Start reaps them. The lock file is created under a temporary
// name and renamed into place once locked, so a reaper never takes the
// lock of a host that is still being set up.

const (
	hostPattern = "tether-ctrd-*"
	ownerLock   = "owner.lock"
)

// lockDir takes ownership of dir for this process.
func lockDir(dir string) (*os.File, error) {
	tmp := filepath.Join(dir, ownerLock+".new")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_RDWR|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock host dir: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock host dir: %w", err)
	}
	fmt.Fprintf(f, "%d\n", os.Getpid()) // for people: who owns it
	if err := os.Rename(tmp, filepath.Join(dir, ownerLock)); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock host dir: %w", err)
	}
	return f, nil
}

// reapStale tears down the hosts in os.TempDir() whose owner died, and
// returns what it did, one line a host.
func reapStale() []string {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), hostPattern))
	var reaped []string
	for _, dir := range dirs {
		f, err := os.OpenFile(filepath.Join(dir, ownerLock), os.O_RDWR, 0)
		if err != nil {
			continue // being set up, or being removed
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
			f.Close() // its owner lives
			continue
		}
		stale := &Host{Dir: dir}
		err = stale.reapLeftovers(nil, 0) // nothing ends by itself there
		if rmErr := os.RemoveAll(dir); rmErr != nil && err == nil {
			err = rmErr
		}
		f.Close()
		reaped = append(reaped, fmt.Sprintf("%s: %v", dir, err))
	}
	return reaped
}
