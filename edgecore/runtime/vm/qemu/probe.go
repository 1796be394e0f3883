package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// The acceleration probe.
//
// Opening /dev/kvm proves nothing: on the nested hosts Tether's CI runs on
// /dev/kvm opens, KVM_CREATE_VM works, and the guest then hangs (or QEMU
// aborts setting MSRs with -cpu host). So the probe runs a real guest and
// waits for a guest-side effect: SeaBIOS boots a 512-byte boot sector
// whose code writes 0x2a to the isa-debug-exit port, which makes QEMU
// exit with status (0x2a<<1)|1 = 85. That needs the firmware to run in
// real and 32-bit protected mode and the guest's own code to run, with
// the CPU model Start uses (-cpu host under KVM). No exit 85 within the
// timeout (a hang, an abort, an error) means KVM does not work here; the
// same guest is then run under TCG to check that QEMU works at all.
//
// The "pc" machine is used, not Start's q35: on q35 SeaBIOS did not boot
// the IDE boot sector within 10 s even under TCG here (QEMU 7.2), while
// on pc it exits in 0.2-0.3 s. Both machines use the same KVM and CPU
// code, which is what the probe is about.

// probeExit is QEMU's exit status when the probe guest ran.
const probeExit = 0x2a<<1 | 1

// bootSector is the probe guest: mov al,0x2a; out 0xf4,al; hlt; jmp $-1;
// then the 0x55 0xaa signature at bytes 510-511.
func bootSector() []byte {
	b := make([]byte, 512)
	copy(b, []byte{0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd})
	b[510], b[511] = 0x55, 0xaa
	return b
}

// ProbeConfig tunes ProbeAccel. The zero value works.
type ProbeConfig struct {
	// Binary is the QEMU executable; "" means DefaultBinary.
	Binary string
	// Timeout bounds each guest run. Zero means 10 s: the probe guest
	// exits in well under a second when the acceleration works, even
	// under TCG on a loaded machine.
	Timeout time.Duration
	// CPU overrides the guest CPU model tried under KVM; "" means Start's
	// ("host"). Tests use it to show the hang path ("qemu64" hangs here).
	CPU string
	// Logger receives the answer and its reason; nil discards.
	Logger *slog.Logger
}

// ProbeResult is the probe's answer.
type ProbeResult struct {
	// Accel is AccelKVM or AccelTCG.
	Accel string
	// Reason says why KVM was not chosen ("" when it was).
	Reason string
	// KVMTook and TCGTook are how long each guest run took (TCGTook is
	// zero when KVM worked and TCG was not tried).
	KVMTook, TCGTook time.Duration
}

// Probe answers "kvm" or "tcg" for binary on this host (see ProbeAccel).
// It takes up to a few seconds; callers cache the answer.
func Probe(ctx context.Context, binary string) (string, error) {
	r, err := ProbeAccel(ctx, ProbeConfig{Binary: binary})
	return r.Accel, err
}

// ProbeAccel runs the probe guest under KVM and, when that fails, under
// TCG. The error is set only when neither runs it (QEMU is missing or
// broken), and then Accel is empty.
func ProbeAccel(ctx context.Context, cfg ProbeConfig) (ProbeResult, error) {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.CPU == "" {
		cfg.CPU = cpuModel(AccelKVM)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	bin, err := lookPath(cfg.Binary)
	if err != nil {
		return ProbeResult{}, err
	}
	dir, err := os.MkdirTemp("", "tether-probe-")
	if err != nil {
		return ProbeResult{}, fmt.Errorf("create probe dir: %w", err)
	}
	defer os.RemoveAll(dir)
	disk := filepath.Join(dir, "boot.img")
	if err := os.WriteFile(disk, bootSector(), 0o600); err != nil {
		return ProbeResult{}, fmt.Errorf("write probe guest: %w", err)
	}

	var r ProbeResult
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		r.Reason = "open /dev/kvm: " + err.Error()
	} else {
		_ = f.Close()
		r.KVMTook, err = runProbeGuest(ctx, bin, disk, AccelKVM, cfg.CPU, cfg.Timeout)
		if err == nil {
			r.Accel = AccelKVM
			log.Info("acceleration probed", "accel", r.Accel, "took", r.KVMTook)
			return r, nil
		}
		r.Reason = "kvm guest (-cpu " + cfg.CPU + "): " + err.Error()
	}
	if ctx.Err() != nil {
		return ProbeResult{}, fmt.Errorf("probe acceleration: %w", ctx.Err())
	}
	r.TCGTook, err = runProbeGuest(ctx, bin, disk, AccelTCG, cpuModel(AccelTCG), cfg.Timeout)
	if err != nil {
		return ProbeResult{}, fmt.Errorf("probe acceleration: kvm failed (%s) and tcg failed: %w", r.Reason, err)
	}
	r.Accel = AccelTCG
	log.Info("acceleration probed", "accel", r.Accel, "reason", r.Reason, "took", r.TCGTook)
	return r, nil
}

// errProbeHang is a probe guest that did not exit within the timeout.
var errProbeHang = errors.New("guest made no progress")

// runProbeGuest boots the probe disk and returns nil when QEMU exited 85.
func runProbeGuest(ctx context.Context, bin, disk, accel, cpu string, timeout time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-machine", "pc", "-accel", accel, "-cpu", cpu,
		"-nodefaults", "-no-user-config", "-display", "none", "-m", "16",
		"-drive", "file="+esc(disk)+",format=raw,if=ide,snapshot=on",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=0x04")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit) && exit.ExitCode() == probeExit:
		return took, nil
	case ctx.Err() != nil:
		return took, fmt.Errorf("%w within %s", errProbeHang, timeout)
	case err == nil:
		return took, fmt.Errorf("qemu exited 0 without the guest's exit code %d: %s", probeExit, lastLine(out.Bytes()))
	default:
		return took, fmt.Errorf("qemu failed (%w): %s", err, lastLine(out.Bytes()))
	}
}

// lastLine is QEMU's last line that says "error", else its last line,
// for a reason.
func lastLine(b []byte) string {
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	for i := len(lines) - 1; i >= 0; i-- {
		if bytes.Contains(lines[i], []byte("error")) {
			return string(lines[i])
		}
	}
	return string(lines[len(lines)-1])
}
