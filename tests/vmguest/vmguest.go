// Package vmguest gives tests of the VM runtime the test guest of
// tests/guest as an image of the edge image store, and the accelerator
// the real probe finds on this host. It is for tests only.
package vmguest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qemu"
	"github.com/tetheredge/tether/tests/guest"
)

// ImageName is the name tests import the guest under.
const ImageName = "tether-guest"

// DiskSize is the guest image's raw disk: the guest counts its boots in
// its first bytes.
const DiskSize = 16 << 20

// Import builds the guest (tests/guest: cached under _output/guest) and
// imports it into st as ImageName: a raw disk for direct kernel boot with
// the guest's kernel, initramfs and command line.
func Import(tb testing.TB, st *vm.Images) vm.Image {
	tb.Helper()
	p := guest.Build(tb)
	disk := filepath.Join(tb.TempDir(), "disk.raw")
	require.NoError(tb, os.WriteFile(disk, make([]byte, DiskSize), 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	img, err := st.Import(ctx, ImageName, disk, vm.Boot{Kernel: p.Kernel, Initrd: p.Initrd, Cmdline: p.Cmdline})
	require.NoError(tb, err)
	return img
}

var probe struct {
	once  sync.Once
	accel string
	err   error
}

// Accel is the real probe's answer for qemu-system-x86_64, probed once
// per test binary.
func Accel(tb testing.TB) string {
	tb.Helper()
	probe.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		probe.accel, probe.err = qemu.Probe(ctx, "")
	})
	require.NoError(tb, probe.err)
	return probe.accel
}

// RunDir is a short directory for the backend's per-VM directories (a QMP
// socket path has at most 107 bytes), removed when the test ends. Any QEMU
// still running from it then is killed, and is an error of a test that
// had not failed already.
func RunDir(tb testing.TB) string {
	tb.Helper()
	d, err := os.MkdirTemp("", "tvm-")
	require.NoError(tb, err)
	tb.Cleanup(func() {
		killLeftovers(tb, d)
		_ = os.RemoveAll(d)
	})
	return d
}

// killLeftovers kills (and reaps, when it is the test's child) every QEMU
// whose command line names runDir.
func killLeftovers(tb testing.TB, runDir string) {
	tb.Helper()
	ents, err := os.ReadDir("/proc")
	require.NoError(tb, err)
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), runDir+"/") {
			continue
		}
		if !tb.Failed() {
			tb.Errorf("qemu %d of this test still runs", pid)
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
		_, _ = syscall.Wait4(pid, nil, 0, nil)
	}
}

// CountMarker counts the lines of the file at path that hold marker.
func CountMarker(path, marker string) int {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return bytes.Count(data, []byte(marker))
}
