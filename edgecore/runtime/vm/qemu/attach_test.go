package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	buildguest "github.com/tetheredge/tether/build/guest"
	"github.com/tetheredge/tether/tests/guest"
	"github.com/tetheredge/tether/tests/testlog"
)

// childEnv carries the spec (JSON) to the re-executed test binary that
// plays EdgeCore in TestAttachAfterSIGKILL.
const childEnv = "TETHER_QEMU_TEST_CHILD"

// childOwnName makes the child name the VM after itself (guest.Name).
const childOwnName = "TETHER_QEMU_TEST_CHILD_OWN_NAME"

// runChild starts the spec's QEMU, prints "pid P vcpus T1 T2..." and
// blocks until it is killed.
func runChild() {
	var spec Spec
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "child: decode spec:", err)
		os.Exit(2)
	}
	if os.Getenv(childOwnName) != "" {
		spec.Name = guest.Name(spec.Name)
	}
	ctx := context.Background()
	m, err := Start(ctx, spec, Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: start:", err)
		os.Exit(2)
	}
	tids, err := m.VCPUThreads(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: vcpu threads:", err)
		os.Exit(2)
	}
	fmt.Printf("pid %d vcpus %s\n", m.Pid(), strings.Trim(fmt.Sprint(tids), "[]"))
	select {} // until SIGKILL
}

// EdgeCore (here a child test binary) starts a VM and its process group is
// SIGKILLed: QEMU, in its own session, survives; a new Machine adopts it by pid, sees the
// same vCPU threads (and pinning), and powers it down. The guest booted
// once. A Machine that is merely Closed is adopted again the same way.
func TestAttachAfterSIGKILL(t *testing.T) {
	spec := guestSpec(t, "adopt", 2, 128)
	spec.SharedCPUs = []int{0}
	spec.DedicatedCPUs = []int{1, 0}
	child, pid, want := startChild(t, spec)
	require.Eventually(t, func() bool { return count(t, spec.SerialLog, buildguest.BootMarker) == 1 },
		bootTimeout, 50*time.Millisecond, "no boot marker:\n%s", readFile(spec.SerialLog))
	// SIGKILL to the whole process group, as a supervisor stopping
	// EdgeCore would: QEMU is in a session of its own and is not hit.
	killChild(t, child)
	require.NoError(t, unix.Kill(pid, 0), "qemu died with its parent")

	ctx := t.Context()
	m, err := Attach(ctx, spec, pid, Options{Logger: testlog.New()})
	require.NoError(t, err)
	got, err := m.VCPUThreads(ctx)
	require.NoError(t, err)
	require.Equal(t, want, got)
	requireAffinity(t, pid, got, spec)
	st, err := m.QMP().QueryStatus(ctx)
	require.NoError(t, err)
	require.True(t, st.Running)
	require.NoError(t, m.Close())
	select {
	case <-m.Done():
		t.Fatal("Close stopped qemu")
	default:
	}

	m, err = Attach(ctx, spec, pid, Options{Logger: testlog.New()})
	require.NoError(t, err)
	defer m.Close()
	how, err := m.Stop(ctx, 2*time.Minute)
	require.NoError(t, err)
	require.Equal(t, EndedPowerdown, how)
	require.Equal(t, -1, m.ExitCode(), "an adopted qemu is not our child: its status is unknown")
	require.Equal(t, 1, count(t, spec.SerialLog, buildguest.BootMarker), "the guest was restarted")
}

// Attach refuses a pid that is not the spec's QEMU.
func TestAttachRefuses(t *testing.T) {
	spec := guestSpec(t, "other", 1, 128)
	m := start(t, spec)

	wrong := spec
	wrong.Name = "someone-else"
	_, err := Attach(t.Context(), wrong, m.Pid(), Options{})
	require.ErrorIs(t, err, ErrNotThisVM)

	_, err = Attach(t.Context(), spec, os.Getpid(), Options{})
	require.ErrorIs(t, err, ErrNotThisVM, "the test binary is no qemu")

	require.NoError(t, m.Kill())
	<-m.Done()
	require.Equal(t, 128+int(syscall.SIGKILL), m.ExitCode())
	_, err = Attach(t.Context(), spec, m.Pid(), Options{})
	require.ErrorIs(t, err, ErrNotThisVM, "a reaped qemu")
	_, err = Attach(t.Context(), spec, 0, Options{})
	require.ErrorIs(t, err, ErrNotThisVM)
}

// startChild runs the spec's VM in a child test binary (its own process
// group, as a daemon's) and returns it, QEMU's pid and the vCPU threads.
func startChild(t *testing.T, spec Spec, env ...string) (*exec.Cmd, int, []int) {
	t.Helper()
	b, err := json.Marshal(spec)
	require.NoError(t, err)
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(append(os.Environ(), childEnv+"="+string(b)), env...)
	child.Stderr = os.Stderr
	child.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := child.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, child.Start())
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err, "the child printed no pid")
	f := strings.Fields(line)
	require.GreaterOrEqual(t, len(f), 4, "child said %q", line)
	pid, err := strconv.Atoi(f[1])
	require.NoError(t, err)
	killAtCleanup(t, pid)
	var tids []int
	for _, s := range f[3:] {
		tid, err := strconv.Atoi(s)
		require.NoError(t, err)
		tids = append(tids, tid)
	}
	return child, pid, tids
}

// killChild SIGKILLs the child's whole process group, as a supervisor
// stopping EdgeCore would: QEMU is in a session of its own and is not hit.
func killChild(t *testing.T, child *exec.Cmd) {
	require.NoError(t, unix.Kill(-child.Process.Pid, unix.SIGKILL))
	_ = child.Wait()
}

// The QEMU of a test binary killed before its cleanup is killed by the
// next guest.Build, found by the dead binary's pid in the VM's name.
func TestStaleQEMUReaped(t *testing.T) {
	spec := guestSpec(t, "stale", 1, 128)
	spec.Name = "stale"
	child, pid, _ := startChild(t, spec, childOwnName+"=1")
	fd, err := unix.PidfdOpen(pid, 0)
	require.NoError(t, err)
	defer unix.Close(fd)
	killChild(t, child)
	require.NoError(t, unix.Kill(pid, 0), "qemu died with its parent")

	guest.Build(t)
	require.Eventually(t, func() bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ := unix.Poll(fds, 0)
		return n == 1
	}, time.Minute, 10*time.Millisecond, "the stale qemu still runs")
}
