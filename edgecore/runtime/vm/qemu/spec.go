package qemu

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// Spec is one VM as QEMU runs it. Every path is absolute. The zero value
// of each optional field means "none".
type Spec struct {
	// Name names the VM (QEMU's -name guest=NAME): letters, digits, '.',
	// '_' and '-', at most 64. Attach checks it on the adopted process.
	Name string
	// Dir is the VM's runtime directory (created 0700 if missing): the QMP
	// socket (Dir/qmp.sock) and QEMU's own output (Dir/qemu.log). The
	// socket path must fit a unix address (at most 107 bytes).
	Dir string

	// VCPUs is the number of vCPUs, at least 1.
	VCPUs int
	// MemoryBytes is the guest RAM, a positive multiple of 1 MiB (and of
	// the hugepage size when HugepageDir is set).
	MemoryBytes int64
	// HugepageDir, when set, is a hugetlbfs mount: guest RAM is a
	// memory-backend-file there with prealloc=on (all pages taken at
	// start, so a VM that does not fit fails at once, not later) and
	// share=on (what VFIO devices need).
	HugepageDir string

	// Disk is a qcow2 image (the VM's overlay) attached as virtio-blk.
	Disk string
	// Seed is a raw NoCloud seed image (cloud-init), attached read-only
	// as a second virtio-blk disk.
	Seed string
	// Kernel, Initrd and Cmdline boot a kernel directly; without Kernel
	// the firmware boots from Disk.
	Kernel, Initrd, Cmdline string
	// SerialLog is the file the guest's first serial port (ttyS0) appends
	// to; required (it is the VM's console log).
	SerialLog string
	// VFIO lists host PCI addresses (0000:3b:02.1) passed through with
	// -device vfio-pci,host=ADDR. The devices must already be bound to
	// vfio-pci.
	VFIO []string

	// Accel is "kvm" or "tcg" (Probe says which works here).
	Accel string
	// DedicatedCPUs, when set, has one host CPU per vCPU: vCPU i's thread
	// is pinned to DedicatedCPUs[i] before the guest runs.
	DedicatedCPUs []int
	// SharedCPUs, when set, is the affinity of every other QEMU thread
	// (main loop, I/O, RCU, and the vCPUs when DedicatedCPUs is empty).
	// Empty leaves affinities as inherited.
	SharedCPUs []int
}

// Accelerations.
const (
	AccelKVM = "kvm"
	AccelTCG = "tcg"
)

// QMPSocket is the path of the VM's QMP socket.
func (s Spec) QMPSocket() string { return filepath.Join(s.Dir, "qmp.sock") }

// OutputLog is the file QEMU's own stdout and stderr append to.
func (s Spec) OutputLog() string { return filepath.Join(s.Dir, "qemu.log") }

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	pciRE  = regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)
)

const mib = 1 << 20

// Validate checks the spec; the error names the first bad field.
func (s *Spec) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if !nameRE.MatchString(s.Name) {
		bad("name %q: want 1-64 of [A-Za-z0-9._-], starting with a letter or digit", s.Name)
	}
	if !filepath.IsAbs(s.Dir) {
		bad("dir %q: want an absolute path", s.Dir)
	} else if n := len(s.QMPSocket()); n > 107 {
		bad("dir %q: the QMP socket path is %d bytes, a unix address holds 107", s.Dir, n)
	}
	if s.VCPUs < 1 {
		bad("vcpus %d: want at least 1", s.VCPUs)
	}
	if s.MemoryBytes <= 0 || s.MemoryBytes%mib != 0 {
		bad("memory %d bytes: want a positive multiple of 1 MiB", s.MemoryBytes)
	}
	for field, p := range map[string]string{"hugepage dir": s.HugepageDir, "disk": s.Disk, "seed": s.Seed,
		"kernel": s.Kernel, "initrd": s.Initrd} {
		if p != "" && !filepath.IsAbs(p) {
			bad("%s %q: want an absolute path", field, p)
		}
	}
	if !filepath.IsAbs(s.SerialLog) {
		bad("serial log %q: want an absolute path", s.SerialLog)
	}
	if s.Initrd != "" && s.Kernel == "" {
		bad("initrd without a kernel")
	}
	if s.Cmdline != "" && s.Kernel == "" {
		bad("cmdline without a kernel")
	}
	if s.Kernel == "" && s.Disk == "" {
		bad("nothing to boot: neither kernel nor disk")
	}
	for _, a := range s.VFIO {
		if !pciRE.MatchString(a) {
			bad("vfio address %q: want DDDD:BB:SS.F in lower-case hex", a)
		}
	}
	if s.Accel != AccelKVM && s.Accel != AccelTCG {
		bad("accel %q: want %q or %q", s.Accel, AccelKVM, AccelTCG)
	}
	if len(s.DedicatedCPUs) != 0 && len(s.DedicatedCPUs) != s.VCPUs {
		bad("dedicated cpus %v: want one per vCPU (%d)", s.DedicatedCPUs, s.VCPUs)
	}
	seen := map[int]bool{}
	for _, c := range s.DedicatedCPUs {
		if c < 0 || seen[c] {
			bad("dedicated cpus %v: want distinct CPUs >= 0", s.DedicatedCPUs)
			break
		}
		seen[c] = true
	}
	for _, c := range s.SharedCPUs {
		if c < 0 {
			bad("shared cpus %v: want CPUs >= 0", s.SharedCPUs)
			break
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("invalid vm spec: %w", err)
	}
	return nil
}

// esc doubles commas, QEMU's escape for a comma inside an option value.
func esc(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// nameArg is the value of -name; Attach looks for it in the process's
// command line.
func (s *Spec) nameArg() string { return "guest=" + s.Name + ",debug-threads=on" }

// qmpArg is the QMP chardev; Attach looks for it too.
func (s *Spec) qmpArg() string {
	return "socket,id=qmp,path=" + esc(s.QMPSocket()) + ",server=on,wait=off"
}

// cpuModel is the guest CPU for an acceleration: the host's own CPU under
// KVM, every feature TCG emulates under TCG.
func cpuModel(accel string) string {
	if accel == AccelKVM {
		return "host"
	}
	return "max"
}

// Args is QEMU's command line for the spec (without the binary). QEMU
// starts with the vCPUs stopped (-S): Start pins them, then continues.
func (s *Spec) Args() []string {
	memMiB := strconv.FormatInt(s.MemoryBytes/mib, 10) + "M"
	accel := "kvm"
	if s.Accel == AccelTCG {
		accel = "tcg,thread=multi" // one host thread per vCPU, so each can be pinned
	}
	machine := "q35"
	a := []string{
		"-name", s.nameArg(),
		"-no-user-config", "-nodefaults", "-display", "none",
		"-accel", accel,
		"-cpu", cpuModel(s.Accel),
		"-smp", strconv.Itoa(s.VCPUs),
		"-m", memMiB,
	}
	if s.HugepageDir != "" {
		a = append(a, "-object", "memory-backend-file,id=ram0,size="+memMiB+",mem-path="+esc(s.HugepageDir)+
			",prealloc=on,share=on")
		machine += ",memory-backend=ram0"
	}
	a = append(a, "-machine", machine,
		"-chardev", s.qmpArg(), "-mon", "chardev=qmp,mode=control",
		"-chardev", "file,id=serial0,path="+esc(s.SerialLog)+",append=on", "-serial", "chardev:serial0",
	)
	if s.Kernel != "" {
		a = append(a, "-kernel", s.Kernel)
		if s.Initrd != "" {
			a = append(a, "-initrd", s.Initrd)
		}
		if s.Cmdline != "" {
			a = append(a, "-append", s.Cmdline)
		}
	}
	if s.Disk != "" {
		a = append(a, "-drive", "if=none,id=disk0,format=qcow2,file="+esc(s.Disk),
			"-device", "virtio-blk-pci,drive=disk0,bootindex=1")
	}
	if s.Seed != "" {
		a = append(a, "-drive", "if=none,id=seed0,format=raw,readonly=on,file="+esc(s.Seed),
			"-device", "virtio-blk-pci,drive=seed0")
	}
	for _, addr := range s.VFIO {
		a = append(a, "-device", "vfio-pci,host="+addr)
	}
	return append(a, "-S")
}
