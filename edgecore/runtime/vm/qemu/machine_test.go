package qemu

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	buildguest "github.com/tetheredge/tether/build/guest"
	"github.com/tetheredge/tether/tests/testlog"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		runChild() // the "EdgeCore" of TestAttachAfterSIGKILL; never returns
	}
	goleak.VerifyTestMain(m)
}

// The guest boots under the probed acceleration, its boot marker reaches
// the serial log, and the ACPI power button (system_powerdown) makes the
// guest power itself off: QEMU exits 0 within the grace, without quit.
func TestBootAndPowerdown(t *testing.T) {
	spec := guestSpec(t, "boot", 1, 128)
	m := start(t, spec)
	events := collect(m)
	waitBooted(t, m)

	how, err := m.Stop(t.Context(), 2*time.Minute)
	require.NoError(t, err)
	require.Equal(t, EndedPowerdown, how, "the guest ignored the power button; serial log:\n%s", readFile(spec.SerialLog))
	require.Equal(t, 0, m.ExitCode())
	require.Equal(t, 1, count(t, spec.SerialLog, buildguest.PowerdownMarker))
	require.Equal(t, []string{"RESUME", "POWERDOWN", "SHUTDOWN"}, events())
	how, err = m.Stop(t.Context(), time.Second)
	require.NoError(t, err)
	require.Equal(t, EndedExited, how)
	require.NoError(t, m.Close())
	require.NoError(t, m.Close())
}

// A guest that ignores the power button (here: QEMU's vCPUs paused, so
// the guest cannot act) is quit after the grace.
func TestStopQuitsAfterGrace(t *testing.T) {
	spec := guestSpec(t, "quit", 1, 128)
	m := start(t, spec)
	waitBooted(t, m)
	require.NoError(t, m.QMP().Stop(t.Context()))

	how, err := m.Stop(t.Context(), 500*time.Millisecond)
	require.NoError(t, err)
	require.Equal(t, EndedQuit, how)
	require.Equal(t, 0, m.ExitCode())
	require.Zero(t, count(t, spec.SerialLog, buildguest.PowerdownMarker))
}

// The disk marker: the guest counts its boots in the first bytes of a
// qcow2 disk, so a second boot on the same disk says boot=2.
func TestDiskMarker(t *testing.T) {
	spec := guestSpec(t, "disk", 1, 128)
	spec.Disk = filepath.Join(t.TempDir(), "disk.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", spec.Disk, "16M")
	for boot := 1; boot <= 2; boot++ {
		m := start(t, spec)
		waitBoots(t, m, boot)
		require.Equal(t, 1, count(t, spec.SerialLog, buildguest.DiskMarker+itoa(boot)), "serial log:\n%s", readFile(spec.SerialLog))
		how, err := m.Stop(t.Context(), 2*time.Minute)
		require.NoError(t, err)
		require.Equal(t, EndedPowerdown, how)
		require.NoError(t, m.Close())
	}
}

// Bad input is refused before QEMU starts, and a QEMU that refuses its
// command line is reported with its own words and leaves no process.
func TestStartRefuses(t *testing.T) {
	spec := guestSpec(t, "bad", 1, 128)
	for _, tc := range []struct {
		name string
		mod  func(*Spec)
		want string
	}{
		{"name", func(s *Spec) { s.Name = "a,b" }, "name"},
		{"vcpus", func(s *Spec) { s.VCPUs = 0 }, "vcpus"},
		{"memory", func(s *Spec) { s.MemoryBytes = 1000 }, "memory"},
		{"accel", func(s *Spec) { s.Accel = "hvf" }, "accel"},
		{"dedicated", func(s *Spec) { s.DedicatedCPUs = []int{0, 1} }, "dedicated"},
		{"vfio", func(s *Spec) { s.VFIO = []string{"3b:02.1"} }, "vfio"},
		{"relative", func(s *Spec) { s.Disk = "disk.qcow2" }, "disk"},
		{"long dir", func(s *Spec) { s.Dir = "/" + string(make([]byte, 120)) }, "unix address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := spec
			tc.mod(&s)
			_, err := Start(t.Context(), s, Options{})
			require.ErrorContains(t, err, tc.want)
		})
	}
	s := spec
	s.Disk = filepath.Join(t.TempDir(), "missing.qcow2")
	_, err := Start(t.Context(), s, Options{Logger: testlog.New()})
	require.ErrorContains(t, err, "missing.qcow2")
	require.ErrorContains(t, err, "qemu exited with code 1")
}

// A QEMU that answers nothing (frozen with SIGSTOP) is still stopped:
// the power button and quit time out, SIGKILL ends it.
func TestStopKillsFrozenQEMU(t *testing.T) {
	spec := guestSpec(t, "frozen", 1, 128)
	m := start(t, spec)
	require.NoError(t, syscall.Kill(m.Pid(), syscall.SIGSTOP))

	how, err := m.Stop(t.Context(), time.Second)
	require.NoError(t, err)
	require.Equal(t, EndedKill, how)
	require.Equal(t, 128+int(syscall.SIGKILL), m.ExitCode())
}
