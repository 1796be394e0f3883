// Package guest gives tests Tether's test guest (build/guest) and checks
// that QEMU is installed. It is for tests only: it fails the test (never
// skips it) when something is missing, and says which make target
// installs it.
package guest

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

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
	p, err := guest.Build(guest.Config{CacheDir: filepath.Join(moduleRoot(tb), "_output", "guest")})
	if err != nil {
		tb.Fatalf("build the test guest (make runtime-deps installs its inputs): %v", err)
	}
	return p
}

// moduleRoot is two directories above this source file.
func moduleRoot(tb testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		tb.Fatal("find the module root: no caller information")
	}
	return filepath.Dir(filepath.Dir(filepath.Dir(file)))
}
