package qemu

import (
	"context"
	"fmt"
	"time"
)

// Ending says how Stop ended QEMU.
type Ending string

const (
	// EndedExited means QEMU had already exited when Stop was called.
	EndedExited Ending = "exited"
	// EndedPowerdown means the guest shut down after the ACPI power button.
	EndedPowerdown Ending = "powerdown"
	// EndedQuit means the guest did not shut down within the grace: QMP quit.
	EndedQuit Ending = "quit"
	// EndedKill means quit did not end QEMU either: SIGKILL.
	EndedKill Ending = "kill"
)

// quitWait is how long Stop waits for QEMU to exit after quit, and
// after SIGKILL.
const quitWait = 5 * time.Second

// Stop ends QEMU the gentlest way that works: the ACPI power button, up
// to grace for the guest to shut down, then QMP quit, then SIGKILL. It
// returns how it ended, once QEMU has exited; the error is set only when
// even SIGKILL did not end it (or ctx ended first).
func (m *Machine) Stop(ctx context.Context, grace time.Duration) (Ending, error) {
	select {
	case <-m.done:
		return EndedExited, nil
	default:
	}
	// The grace bounds the power button command too: a QEMU that does not
	// answer QMP must not hold Stop up.
	deadline := time.Now().Add(grace)
	pctx, cancel := context.WithDeadline(ctx, deadline)
	err := m.Powerdown(pctx)
	cancel()
	if err == nil {
		if m.waitExit(ctx, time.Until(deadline)) {
			return EndedPowerdown, nil
		}
	} else {
		m.log.Info("vm powerdown refused", "err", err)
	}
	qctx, cancel := context.WithTimeout(ctx, quitWait)
	err = m.Quit(qctx)
	cancel()
	if err != nil {
		m.log.Info("vm quit refused", "err", err)
	}
	if m.waitExit(ctx, quitWait) {
		return EndedQuit, nil
	}
	if err := m.Kill(); err != nil {
		return "", err
	}
	if m.waitExit(ctx, quitWait) {
		return EndedKill, nil
	}
	if ctx.Err() != nil {
		return "", fmt.Errorf("stop vm: %w", ctx.Err())
	}
	return "", fmt.Errorf("stop vm: qemu %d still runs %s after SIGKILL", m.pid, quitWait)
}

// waitExit waits up to d (and ctx) for QEMU's exit.
func (m *Machine) waitExit(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-m.done:
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}
