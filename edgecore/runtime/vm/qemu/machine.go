// Package qemu runs one QEMU process per VM and keeps hold of it: the
// command line from a Spec, the start (in its own session, vCPUs pinned
// before the guest runs), the watch (a pidfd, so the exit of a QEMU that
// is not our child is seen too), the adoption of a running QEMU after
// EdgeCore restarts, the stop (ACPI powerdown, quit, kill), and the probe
// that says whether KVM really works here.
//
// It knows nothing of CRI, pods or the store: edgecore/runtime/vm builds
// the Spec from a sandbox and records the pid. It never restarts a guest.
package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tetheredge/tether/edgecore/runtime/vm/qmp"
)

// DefaultBinary is the QEMU used when Options.Binary is empty (Debian's
// qemu-system-x86).
const DefaultBinary = "qemu-system-x86_64"

// Options are the process-wide settings of Start and Attach. The zero
// value works.
type Options struct {
	// Binary is the QEMU executable; "" means DefaultBinary from PATH.
	Binary string
	// Logger receives the machine's logs; nil discards them.
	Logger *slog.Logger
	// EventBuffer is the QMP event buffer (qmp.Config.EventBuffer); zero
	// means qmp.DefaultEventBuffer.
	EventBuffer int
}

func (o Options) withDefaults() Options {
	if o.Binary == "" {
		o.Binary = DefaultBinary
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// ErrNotThisVM is returned by Attach when the pid is not the QEMU of the
// spec (it exited and the pid was reused, or the record is wrong).
var ErrNotThisVM = errors.New("qemu: process is not this vm's qemu")

// Machine is one running QEMU being watched. Its methods are safe for
// concurrent use.
type Machine struct {
	spec  Spec
	pid   int
	pidfd int
	qmp   *qmp.Client
	log   *slog.Logger

	done     chan struct{} // closed when QEMU has exited
	exitCode int           // valid once done is closed

	wake      int // eventfd that stops the watcher
	watchDone chan struct{}
	closeOnce sync.Once
}

// Start starts QEMU for spec and returns once the guest runs: QEMU is
// started stopped (-S) in its own session (setsid, no parent-death
// signal: it outlives an EdgeCore that is SIGKILLed), QMP is connected,
// vCPU threads are pinned to spec.DedicatedCPUs and the other threads to
// spec.SharedCPUs, then the vCPUs continue. On any failure QEMU is killed
// and the error says why (with the tail of QEMU's own output when it
// exited).
func Start(ctx context.Context, spec Spec, o Options) (*Machine, error) {
	o = o.withDefaults()
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create vm dir: %w", err)
	}
	if err := os.Remove(spec.QMPSocket()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale qmp socket: %w", err)
	}
	pid, pidfd, err := spawn(o.Binary, spec)
	if err != nil {
		return nil, err
	}
	m, err := newMachine(spec, pid, pidfd, o.Logger)
	if err != nil {
		_ = unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
		_ = unix.Close(pidfd)
		return nil, err
	}
	fail := func(err error) (*Machine, error) {
		_ = m.Kill()
		<-m.done
		m.stopWatching()
		return nil, err
	}
	c, err := dialWhileRunning(ctx, m, o)
	if err != nil {
		return fail(err)
	}
	m.qmp = c
	if err := m.pin(ctx); err != nil {
		return fail(err)
	}
	if err := c.Cont(ctx); err != nil {
		return fail(fmt.Errorf("start vcpus: %w", err))
	}
	m.log.Info("vm started", "pid", pid, "accel", spec.Accel, "vcpus", spec.VCPUs)
	return m, nil
}

// spawn forks QEMU with stdout and stderr appended to the VM's output log.
func spawn(binary string, spec Spec) (pid, pidfd int, err error) {
	path, err := lookPath(binary)
	if err != nil {
		return 0, 0, err
	}
	out, err := os.OpenFile(spec.OutputLog(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return 0, 0, fmt.Errorf("open qemu output log: %w", err)
	}
	defer out.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		return 0, 0, fmt.Errorf("open %s: %w", os.DevNull, err)
	}
	defer null.Close()
	pidfd = -1
	argv := append([]string{path}, spec.Args()...)
	pid, err = syscall.ForkExec(path, argv, &syscall.ProcAttr{
		Dir:   spec.Dir,
		Env:   []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
		Files: []uintptr{null.Fd(), out.Fd(), out.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true, PidFD: &pidfd},
	})
	if err != nil {
		return 0, 0, fmt.Errorf("start %s: %w", path, err)
	}
	return pid, pidfd, nil
}

// dialWhileRunning connects to the QMP socket once QEMU has created it,
// giving up when QEMU exits or ctx ends.
func dialWhileRunning(ctx context.Context, m *Machine, o Options) (*qmp.Client, error) {
	backoff := 2 * time.Millisecond
	for {
		c, err := qmp.Dial(ctx, m.spec.QMPSocket(), qmp.Config{EventBuffer: o.EventBuffer})
		if err == nil {
			return c, nil
		}
		t := time.NewTimer(backoff)
		select {
		case <-m.done:
			t.Stop()
			return nil, fmt.Errorf("qemu exited with code %d before its qmp socket answered: %s",
				m.exitCode, tail(m.spec.OutputLog(), 8))
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("connect qmp: %w (last: %w)", ctx.Err(), err)
		case <-t.C:
		}
		backoff = min(2*backoff, 100*time.Millisecond)
	}
}

// Attach adopts a QEMU that runs spec, e.g. after EdgeCore restarted: it
// holds the pid with a pidfd, checks that the process's command line is
// spec's (its -name and QMP socket), connects QMP and re-applies the CPU
// affinities (idempotent). The guest is never stopped or restarted.
func Attach(ctx context.Context, spec Spec, pid int, o Options) (*Machine, error) {
	o = o.withDefaults()
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if pid <= 0 {
		return nil, fmt.Errorf("attach pid %d: %w", pid, ErrNotThisVM)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("attach pid %d: process gone: %w", pid, ErrNotThisVM)
		}
		return nil, fmt.Errorf("open pidfd of %d: %w", pid, err)
	}
	// The pidfd pins the pid: from here on the pid cannot be reused, so
	// what /proc says about it is about the process the pidfd holds.
	if err := checkCmdline(pid, spec); err != nil {
		_ = unix.Close(pidfd)
		return nil, err
	}
	m, err := newMachine(spec, pid, pidfd, o.Logger)
	if err != nil {
		_ = unix.Close(pidfd)
		return nil, err
	}
	c, err := qmp.Dial(ctx, spec.QMPSocket(), qmp.Config{EventBuffer: o.EventBuffer})
	if err != nil {
		m.stopWatching()
		return nil, fmt.Errorf("attach pid %d: %w", pid, err)
	}
	m.qmp = c
	if err := m.pin(ctx); err != nil {
		_ = c.Close()
		m.stopWatching()
		return nil, fmt.Errorf("attach pid %d: %w", pid, err)
	}
	m.log.Info("vm adopted", "pid", pid)
	return m, nil
}

// checkCmdline verifies that pid runs with spec's -name and QMP socket.
func checkCmdline(pid int, spec Spec) error {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return fmt.Errorf("read cmdline of %d: %w", pid, err)
	}
	args := bytes.Split(bytes.TrimRight(raw, "\x00"), []byte{0})
	hasPair := func(flag, value string) bool {
		for i := 0; i+1 < len(args); i++ {
			if string(args[i]) == flag && string(args[i+1]) == value {
				return true
			}
		}
		return false
	}
	if !hasPair("-name", spec.nameArg()) || !hasPair("-chardev", spec.qmpArg()) {
		return fmt.Errorf("attach pid %d: its command line has not -name %s and qmp socket %s: %w",
			pid, spec.nameArg(), spec.QMPSocket(), ErrNotThisVM)
	}
	return nil
}

// newMachine starts watching pidfd. It does not own pidfd on failure.
func newMachine(spec Spec, pid, pidfd int, log *slog.Logger) (*Machine, error) {
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("create eventfd: %w", err)
	}
	m := &Machine{
		spec: spec, pid: pid, pidfd: pidfd,
		log:       log.With("vm", spec.Name),
		done:      make(chan struct{}),
		exitCode:  -1,
		wake:      wake,
		watchDone: make(chan struct{}),
	}
	go m.watch()
	return m, nil
}

// watch waits for QEMU's exit on the pidfd (or for Close). If QEMU is our
// child it is reaped and its exit code kept; an adopted QEMU's exit code
// is unknown (-1).
func (m *Machine) watch() {
	defer close(m.watchDone)
	fds := []unix.PollFd{{Fd: int32(m.pidfd), Events: unix.POLLIN}, {Fd: int32(m.wake), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, -1)
		if err != nil && !errors.Is(err, unix.EINTR) {
			m.log.Error("poll pidfd failed", "err", err)
			return
		}
		if fds[1].Revents != 0 {
			return
		}
		if fds[0].Revents != 0 {
			break
		}
	}
	var ws unix.WaitStatus
	if wpid, err := unix.Wait4(m.pid, &ws, unix.WNOHANG, nil); err == nil && wpid == m.pid {
		switch {
		case ws.Exited():
			m.exitCode = ws.ExitStatus()
		case ws.Signaled():
			m.exitCode = 128 + int(ws.Signal())
		}
	}
	m.log.Info("vm exited", "pid", m.pid, "exit_code", m.exitCode)
	close(m.done)
}

// Spec returns the machine's spec.
func (m *Machine) Spec() Spec { return m.spec }

// Pid is QEMU's process id.
func (m *Machine) Pid() int { return m.pid }

// QMP is the machine's QMP connection, for commands this package does
// not wrap.
func (m *Machine) QMP() *qmp.Client { return m.qmp }

// Events are QEMU's QMP events (SHUTDOWN, POWERDOWN, STOP, RESUME,
// RESET, ...); the channel closes when QMP does (QEMU exited, or Close).
func (m *Machine) Events() <-chan qmp.Event { return m.qmp.Events() }

// Done is closed when QEMU has exited (seen on the pidfd). After Close it
// is closed only if QEMU had exited before.
func (m *Machine) Done() <-chan struct{} { return m.done }

// ExitCode is QEMU's exit status once Done is closed: the exit code, or
// 128+signal; -1 when unknown (an adopted QEMU is not our child, so its
// status goes to its real parent) or while it runs.
func (m *Machine) ExitCode() int {
	select {
	case <-m.done:
		return m.exitCode
	default:
		return -1
	}
}

// VCPUThreads returns the host thread id of each vCPU, by vCPU index.
func (m *Machine) VCPUThreads(ctx context.Context) ([]int, error) {
	cpus, err := m.qmp.QueryCPUsFast(ctx)
	if err != nil {
		return nil, fmt.Errorf("query vcpu threads: %w", err)
	}
	tids := make([]int, len(cpus))
	for _, c := range cpus {
		if c.Index < 0 || c.Index >= len(cpus) || c.ThreadID <= 0 {
			return nil, fmt.Errorf("query vcpu threads: unexpected vcpu %d thread %d of %d", c.Index, c.ThreadID, len(cpus))
		}
		tids[c.Index] = c.ThreadID
	}
	return tids, nil
}

// Powerdown presses the ACPI power button (system_powerdown). The guest
// decides whether to shut down; Done says when QEMU exited.
func (m *Machine) Powerdown(ctx context.Context) error {
	if err := m.qmp.SystemPowerdown(ctx); err != nil {
		return fmt.Errorf("powerdown vm: %w", err)
	}
	return nil
}

// Quit makes QEMU exit at once (QMP quit). QEMU closing the socket before
// it answered counts as success.
func (m *Machine) Quit(ctx context.Context) error {
	if err := m.qmp.Quit(ctx); err != nil && !errors.Is(err, qmp.ErrClosed) {
		return fmt.Errorf("quit qemu: %w", err)
	}
	return nil
}

// Kill sends SIGKILL through the pidfd (never to a reused pid). A QEMU
// that already exited is not an error.
func (m *Machine) Kill() error {
	if err := unix.PidfdSendSignal(m.pidfd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill qemu %d: %w", m.pid, err)
	}
	return nil
}

// Close stops watching: it closes QMP and the pidfd and joins the
// watcher. QEMU keeps running (Attach can adopt it again). Idempotent.
func (m *Machine) Close() error {
	m.closeOnce.Do(func() {
		if m.qmp != nil {
			_ = m.qmp.Close()
		}
		m.stopWatching()
	})
	return nil
}

// stopWatching wakes and joins the watcher and closes the fds.
func (m *Machine) stopWatching() {
	_, _ = unix.Write(m.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0}) // eventfd: one native-endian uint64
	<-m.watchDone
	_ = unix.Close(m.wake)
	_ = unix.Close(m.pidfd)
}
