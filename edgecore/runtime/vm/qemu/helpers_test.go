package qemu

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	buildguest "github.com/tetheredge/tether/build/guest"
	"github.com/tetheredge/tether/tests/guest"
	"github.com/tetheredge/tether/tests/testlog"
)

// bootTimeout bounds a TCG boot of the test guest on the shared 2-core
// machine (about 3 s idle, 10-15 s under the other helpers' load).
const bootTimeout = 3 * time.Minute

var (
	probeOnce   sync.Once
	probeResult ProbeResult
	probeErr    error
)

// accel is the real probe's answer, once per test binary.
func accel(t *testing.T) string {
	t.Helper()
	probeOnce.Do(func() {
		probeResult, probeErr = ProbeAccel(context.Background(), ProbeConfig{Logger: testlog.New()})
	})
	require.NoError(t, probeErr)
	return probeResult.Accel
}

// guestSpec is a spec booting the test guest with its serial log in a
// fresh directory.
func guestSpec(t *testing.T, name string, vcpus int, memMiB int64) Spec {
	t.Helper()
	g := guest.Build(t)
	dir := t.TempDir()
	return Spec{
		Name: guest.Name(name), Dir: filepath.Join(dir, "run"),
		VCPUs: vcpus, MemoryBytes: memMiB << 20,
		Kernel: g.Kernel, Initrd: g.Initrd, Cmdline: g.Cmdline,
		SerialLog: filepath.Join(dir, "serial.log"),
		Accel:     accel(t),
	}
}

// start starts spec; cleanup kills QEMU if the test left it running.
func start(t *testing.T, spec Spec) *Machine {
	t.Helper()
	m, err := Start(t.Context(), spec, Options{Logger: testlog.New()})
	require.NoError(t, err)
	killAtCleanup(t, m.Pid())
	t.Cleanup(func() { _ = m.Close() })
	return m
}

// killAtCleanup SIGKILLs pid at the end of the test if it still runs
// the same process (held by a pidfd from now on), and waits for it.
func killAtCleanup(t *testing.T, pid int) {
	fd, err := unix.PidfdOpen(pid, 0)
	require.NoError(t, err)
	t.Cleanup(func() {
		defer unix.Close(fd)
		_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		_, _ = unix.Poll(fds, 10_000)
		var ws unix.WaitStatus
		_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	})
}

// count is how many lines of the serial log are exactly marker.
// Lines end in "\r\n" (the guest's tty adds the \r).
func count(t testing.TB, path, marker string) int {
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatalf("read serial log: %v", err)
	}
	n := 0
	for _, l := range bytes.Split(b, []byte("\n")) {
		if strings.TrimRight(string(l), "\r") == marker {
			n++
		}
	}
	return n
}

// waitBooted waits for the guest's boot marker on the serial console.
func waitBooted(t *testing.T, m *Machine) { waitBoots(t, m, 1) }

// waitBoots waits for the nth boot marker of the serial log (a log shared
// by several boots holds one marker each).
func waitBoots(t *testing.T, m *Machine, n int) {
	t.Helper()
	log := m.Spec().SerialLog
	require.Eventually(t, func() bool {
		select {
		case <-m.Done():
			t.Fatalf("qemu exited (code %d) before the boot marker; serial log:\n%s\nqemu log: %s",
				m.ExitCode(), readFile(log), tail(m.Spec().OutputLog(), 20))
		default:
		}
		return count(t, log, buildguest.BootMarker) >= n
	}, bootTimeout, 50*time.Millisecond, "no boot marker; serial log:\n%s", readFile(log))
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// collect drains a machine's events into a slice until the channel
// closes; the returned func waits for that and returns the names.
func collect(m *Machine) func() []string {
	var names []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range m.Events() {
			names = append(names, ev.Name)
		}
	}()
	return func() []string { <-done; return names }
}

func itoa(i int) string { return strconv.Itoa(i) }

// qemuImg runs qemu-img.
func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	require.NoError(t, err, "qemu-img %v: %s", args, out)
}
