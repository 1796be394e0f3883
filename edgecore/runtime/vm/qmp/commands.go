package qmp

import (
	"context"
)

// Status is the reply of query-status.
type Status struct {
	// Running is true while the guest's vCPUs run.
	Running bool `json:"running"`
	// Status is QEMU's RunState: "running", "paused", "prelaunch",
	// "shutdown", "internal-error", ...
	Status string `json:"status"`
}

// QueryStatus returns the VM's run state.
func (c *Client) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	err := c.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// CPU is one vCPU of query-cpus-fast.
type CPU struct {
	// Index is the vCPU's cpu-index, 0..vCPUs-1.
	Index int `json:"cpu-index"`
	// ThreadID is the host thread (a Linux tid) that runs the vCPU: the
	// top-level "thread-id" of the reply.
	ThreadID int `json:"thread-id"`
	// QOMPath names the vCPU object, e.g. /machine/unattached/device[0].
	QOMPath string `json:"qom-path"`
}

// QueryCPUsFast lists the vCPUs and their host threads without
// interrupting them (query-cpus-fast; the old query-cpus is gone from
// QEMU 6.0 on).
func (c *Client) QueryCPUsFast(ctx context.Context) ([]CPU, error) {
	var cpus []CPU
	err := c.Execute(ctx, "query-cpus-fast", nil, &cpus)
	return cpus, err
}

// SystemPowerdown presses the guest's ACPI power button. It returns once
// QEMU raised the event; whether and when the guest shuts down is up to
// the guest (watch for the SHUTDOWN event or QEMU's exit).
func (c *Client) SystemPowerdown(ctx context.Context) error {
	return c.Execute(ctx, "system_powerdown", nil, nil)
}

// Quit makes QEMU exit at once, without asking the guest. QEMU may close
// the socket before its reply arrives, so ErrClosed after Quit is success.
func (c *Client) Quit(ctx context.Context) error {
	return c.Execute(ctx, "quit", nil, nil)
}

// Stop pauses the vCPUs (a STOP event follows).
func (c *Client) Stop(ctx context.Context) error {
	return c.Execute(ctx, "stop", nil, nil)
}

// Cont resumes the vCPUs (a RESUME event follows); it also starts a VM
// started with -S.
func (c *Client) Cont(ctx context.Context) error {
	return c.Execute(ctx, "cont", nil, nil)
}
