// Package guest gives tests Tether's test guest (build/guest), checks
// that QEMU is installed, and names test VMs so that the QEMUs of a killed
// test binary are found and killed by the next one (Name, Build). It is for tests only: it fails the test (never
// skips it) when something is missing, and says which make target
// installs it.
package guest

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tetheredge/tether/build/guest"
)

// Paths is the guest to boot: Kernel, Initrd and Cmdline for QEMU's
// direct kernel boot.
type Paths = guest.Paths

// Build returns the guest, built into <module root>/_output/guest the
// first time (about a second; afterwards a digest lookup), and checks that
// qemu-system-x86_64 and qemu-img are on PATH.
func Build(tb testing.TB) Paths {
	tb.Helper()
	for _, bin := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(bin); err != nil {
			tb.Fatalf("%s is missing: run `make runtime-deps` (installs qemu-system-x86, qemu-utils, linux-image-cloud-amd64 and busybox-static)", bin)
		}
	}
	reapStale(tb)
	p, err := guest.Build(guest.Config{CacheDir: filepath.Join(moduleRoot(tb), "_output", "guest")})
	if err != nil {
		tb.Fatalf("build the test guest (make runtime-deps installs its inputs): %v", err)
	}
	return p
}

// Name is a VM name for a test: base with this test binary's pid
// ("boot-tp4242"). QEMU runs in a session of its own and outlives a test
// binary that is killed before its cleanup (go test -timeout, SIGKILL);
// Build kills every QEMU whose name carries the pid of a process that is
// gone. A QEMU a test orphans on purpose (adoption tests) keeps the pid of
// the test binary that runs the test, so it is left alone while it runs.
func Name(base string) string { return base + "-tp" + strconv.Itoa(os.Getpid()) }

var nameArg = regexp.MustCompile(`^guest=[A-Za-z0-9._-]*-tp([0-9]+),`)

// reapStale SIGKILLs the QEMUs named by Name for a test binary that died.
func reapStale(tb testing.TB) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, path := range procs {
		raw, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		args := bytes.Split(raw, []byte{0})
		if len(args) < 3 || filepath.Base(string(args[0])) != "qemu-system-x86_64" {
			continue
		}
		for i := 1; i+1 < len(args); i++ {
			if string(args[i]) != "-name" {
				continue
			}
			m := nameArg.FindSubmatch(args[i+1])
			if m == nil {
				break
			}
			owner, _ := strconv.Atoi(string(m[1]))
			if err := unix.Kill(owner, 0); !errors.Is(err, unix.ESRCH) {
				break // its test binary lives (or the pid was reused: left alone)
			}
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(path)))
			if unix.Kill(pid, unix.SIGKILL) == nil {
				tb.Logf("killed qemu %d (%s) of dead test binary %d", pid, args[i+1], owner)
			}
			break
		}
	}
}

// moduleRoot is two directories above this source file.
func moduleRoot(tb testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		tb.Fatal("find the module root: no caller information")
	}
	return filepath.Dir(filepath.Dir(filepath.Dir(file)))
}
