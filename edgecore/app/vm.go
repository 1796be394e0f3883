package app

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/store"
)

// VMConfig is the VM runtime's part of the CRI shim's configuration: with
// it, the shim's VM handler runs virtual machines (edgecore/runtime/vm).
type VMConfig struct {
	// QEMU is the qemu-system binary. Default "qemu-system-x86_64".
	QEMU string
	// QemuImg is the qemu-img binary. Default "qemu-img".
	QemuImg string
	// ImageDir is the edge image store (edgecore vm-image import writes
	// it). Default DataDir/vm-images (edgecore cri: beside its state file).
	ImageDir string
	// RunDir holds each VM's overlay and QMP socket; keep it short (a
	// socket path has at most 107 bytes). Default /run/tether/vm.
	RunDir string
	// HugepageDirs are hugetlbfs mounts by page size ("2Mi", "1Gi") for
	// VMs with hugepages while no resource pool is wired in. Default none.
	HugepageDirs map[string]string
	// Accel forces "kvm" or "tcg". Default: the real probe at startup
	// (qemu.Probe), whose answer is also the Node's label
	// vm.edge.tether.dev/acceleration.
	Accel string
}

// LabelAcceleration is the Node label that says how this node runs VMs.
const LabelAcceleration = "vm.edge.tether.dev/acceleration"

// DefaultVMRunDir is where VMs' runtime files go by default.
const DefaultVMRunDir = "/run/tether/vm"

// newVMBackend opens the image store and builds the VM backend, probing
// the acceleration unless cfg forces it. dataDir is the default image
// store's parent; pool (nil: none) grants dedicated cores, hugepages and
// VFs.
func newVMBackend(ctx context.Context, cfg VMConfig, dataDir string, st *store.Store, pool vm.Pool, logger *slog.Logger, reg prometheus.Registerer) (*vm.Backend, error) {
	dir := cfg.ImageDir
	if dir == "" {
		dir = filepath.Join(dataDir, "vm-images")
	}
	images, err := vm.OpenImages(dir, cfg.QemuImg)
	if err != nil {
		return nil, err
	}
	runDir := cfg.RunDir
	if runDir == "" {
		runDir = DefaultVMRunDir
	}
	b, err := vm.New(ctx, vm.Config{
		QEMU: cfg.QEMU, QemuImg: cfg.QemuImg, Images: images, RunDir: runDir, Accel: cfg.Accel,
		HugepageDirs: cfg.HugepageDirs, Pool: pool, Logger: logger, Registerer: reg,
	}, st.Allocations())
	if err != nil {
		return nil, fmt.Errorf("start the vm runtime: %w", err)
	}
	logger.Info("vm runtime ready", "accel", b.Accel(), "images", dir, "run_dir", runDir)
	return b, nil
}
