package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/edgecore/cri"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qemu"
)

// Pool is the node's resource pool as the backend uses it
// (edgecore/resources implements it): dedicated cores, hugepages and VFs
// for a sandbox, all or nothing, recorded under the sandbox id.
type Pool interface {
	Allocate(ctx context.Context, req resources.Request) (resources.Grant, error)
	Release(ctx context.Context, owner string) error
	Lookup(ctx context.Context, owner string) (resources.Grant, bool, error)
}

// Config configures the backend. Zero values mean the defaults beside each
// field; New fills them into a copy.
type Config struct {
	// QEMU is the qemu-system binary. Default "qemu-system-x86_64".
	QEMU string
	// QemuImg is the qemu-img binary. Default "qemu-img".
	QemuImg string
	// Images is the edge image store. Required.
	Images *Images
	// RunDir holds one directory per VM sandbox: its overlay, QMP socket
	// and user data. It must be short: a QMP socket path has at most 107
	// bytes. Required.
	RunDir string
	// Accel is "kvm" or "tcg", as qemu.Probe answered (probe once, at
	// startup, and pass it here). Default: New probes.
	Accel string
	// Pool grants dedicated cores, hugepages and VFs. Nil: a VM asking for
	// dedicated CPUs or VFs fails with FailedPrecondition, and hugepages
	// come from HugepageDirs.
	Pool Pool
	// HugepageDirs are hugetlbfs mounts by page size ("2Mi", "1Gi"), used
	// without a Pool; the backend accounts the bytes in the allocation
	// table against the pages the kernel has (SysfsRoot). Default none:
	// hugepages without a Pool fail with FailedPrecondition.
	HugepageDirs map[string]string
	// SysfsRoot is where the kernel's hugepage counts are read
	// (SysfsRoot/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages).
	// Default "/sys".
	SysfsRoot string
	// ConsolePoll is how often a running guest's console is converted into
	// its CRI log and read for the boot marker. Default 50 ms.
	ConsolePoll time.Duration
	// OverlayPool is how many qcow2 overlays the backend keeps made ahead
	// per base image (Images.FillOverlays), so that CreateContainer takes
	// one instead of running qemu-img. Default 2; negative: no pool, every
	// overlay made by qemu-img on the create path.
	OverlayPool int
	// OverlayRescan is how often the pools of every image are topped up
	// besides after each VM start (an image imported by another process
	// gets its pool within this). Default 1 minute.
	OverlayRescan time.Duration
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives the backend's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

// Defaults.
const (
	DefaultQEMU          = "qemu-system-x86_64"
	DefaultConsolePoll   = 50 * time.Millisecond
	DefaultOverlayPool   = 2
	DefaultOverlayRescan = time.Minute
)

func (c Config) withDefaults(ctx context.Context) (Config, error) {
	if c.Images == nil {
		return c, errors.New("vm: an image store is required")
	}
	if c.RunDir == "" {
		return c, errors.New("vm: a run directory is required")
	}
	if c.QEMU == "" {
		c.QEMU = DefaultQEMU
	}
	if c.QemuImg == "" {
		c.QemuImg = "qemu-img"
	}
	if c.SysfsRoot == "" {
		c.SysfsRoot = "/sys"
	}
	if c.ConsolePoll <= 0 {
		c.ConsolePoll = DefaultConsolePoll
	}
	switch {
	case c.OverlayPool == 0:
		c.OverlayPool = DefaultOverlayPool
	case c.OverlayPool < 0:
		c.OverlayPool = 0
	}
	if c.OverlayRescan <= 0 {
		c.OverlayRescan = DefaultOverlayRescan
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	dirs := make(map[string]string, len(c.HugepageDirs))
	for size, dir := range c.HugepageDirs {
		if size != "2Mi" && size != "1Gi" {
			return c, fmt.Errorf("vm: hugepage size %q is not 2Mi or 1Gi", size)
		}
		dirs[size] = dir
	}
	c.HugepageDirs = dirs
	switch c.Accel {
	case "kvm", "tcg":
	case "":
		accel, err := qemu.Probe(ctx, c.QEMU)
		if err != nil {
			return c, fmt.Errorf("probe acceleration: %w", err)
		}
		c.Accel = accel
	default:
		return c, fmt.Errorf("vm: acceleration %q is not kvm or tcg", c.Accel)
	}
	return c, nil
}

// Backend is the VM runtime behind the CRI shim. It implements cri.Backend
// and cri.EventSource. Close stops watching the QEMUs and leaves them
// running: a new Backend on the same store adopts them.
type Backend struct {
	cfg    Config
	allocs Allocations
	logger *slog.Logger
	lim    *ratelog.Limiter
	events *cri.Broker
	m      metrics
	// consoleKeep is how much converted console the raw files keep
	// (consoleRawKeep; tests keep everything).
	consoleKeep int64

	// ctx ends at Close: the watchers of running QEMUs stop.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu  sync.Mutex
	vms map[string]*vmState // by sandbox id
	// owner maps container ids to their sandbox ids.
	owner map[string]string

	// fill asks the overlay pool's filler to top the pools up.
	fill chan struct{}

	closeOnce sync.Once
}

// vmState is one sandbox. op serialises its lifecycle calls (a stop can
// take its grace period); mu guards rec and machine, and is never held
// across a call to QEMU.
type vmState struct {
	op      sync.Mutex
	mu      sync.Mutex
	rec     *record
	machine *qemu.Machine // the live container's QEMU, nil when none runs
	// recorded is closed once the running container's exit is recorded.
	recorded chan struct{}
	// console is the running container's console converter, nil when
	// none is open.
	console *consoleLog
}

type metrics struct {
	refused  *prometheus.CounterVec
	overlays *prometheus.CounterVec
	running  prometheus.GaugeFunc
	boots    prometheus.Histogram
	console  *prometheus.CounterVec
}

var (
	_ cri.Backend     = (*Backend)(nil)
	_ cri.EventSource = (*Backend)(nil)
)

// New builds the backend on the allocation table allocs and adopts every
// recorded VM: a QEMU that still runs is attached to (never restarted), a
// dead one is reported exited.
func New(ctx context.Context, cfg Config, allocs Allocations) (*Backend, error) {
	return newBackend(ctx, cfg, allocs, consoleRawKeep)
}

func newBackend(ctx context.Context, cfg Config, allocs Allocations, consoleKeep int64) (*Backend, error) {
	cfg, err := cfg.withDefaults(ctx)
	if err != nil {
		return nil, err
	}
	if allocs == nil {
		return nil, errors.New("vm: an allocation table is required")
	}
	if err := os.MkdirAll(cfg.RunDir, 0o750); err != nil {
		return nil, fmt.Errorf("create vm run directory: %w", err)
	}
	b := &Backend{
		cfg: cfg, allocs: allocs, logger: cfg.Logger.With("component", "vm"), lim: ratelog.New(0, nil),
		events: cri.NewBroker(), vms: map[string]*vmState{}, owner: map[string]string{}, fill: make(chan struct{}, 1), consoleKeep: consoleKeep,
	}
	b.ctx, b.cancel = context.WithCancel(context.WithoutCancel(ctx))
	b.m = metrics{
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_vm_refused_total",
			Help: "VM sandbox and container requests refused, by CRI call and reason.",
		}, []string{"call", "reason"}),
		overlays: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_vm_overlay_pool_total",
			Help: "The overlay pool's events: hit (a VM's disk taken from the pool), miss (made by qemu-img on the create path), rejected (a pooled overlay that failed its check, removed), fill_error (topping a pool up failed).",
		}, []string{"result"}),
		running: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tether_vm_running",
			Help: "QEMU processes the VM backend watches.",
		}, b.countRunning),
		boots: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tether_vm_boot_seconds",
			Help:    "From StartContainer to the guest's boot marker on its console.",
			Buckets: prometheus.ExponentialBuckets(0.125, 2, 10),
		}),
		console: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_vm_console_failures_total",
			Help: "Failures converting a VM's serial console into its CRI log, by operation.",
		}, []string{"op"}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{b.m.refused, b.m.overlays, b.m.running, b.m.boots, b.m.console} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register vm metrics: %w", err)
			}
		}
	}
	if err := b.adopt(ctx); err != nil {
		b.cancel()
		b.wg.Wait()
		return nil, err
	}
	if b.cfg.OverlayPool > 0 {
		b.wg.Add(1)
		go b.fillOverlays()
	}
	return b, nil
}

// Accel is the acceleration VMs run with ("kvm" or "tcg").
func (b *Backend) Accel() string { return b.cfg.Accel }

// Events returns a subscription to container starts (also sent when the
// guest's boot marker is seen, so the pod manager looks at its status
// again) and exits. The channel is closed when ctx ends or at Close.
func (b *Backend) Events(ctx context.Context) <-chan cri.Event { return b.events.Subscribe(ctx) }

// Close stops watching the QEMUs and leaves them running. It is
// idempotent.
func (b *Backend) Close(context.Context) error {
	b.closeOnce.Do(func() {
		b.cancel()
		b.wg.Wait()
		b.events.Close()
	})
	return nil
}

func (b *Backend) countRunning() float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, v := range b.vms {
		v.mu.Lock()
		if v.machine != nil {
			n++
		}
		v.mu.Unlock()
	}
	return float64(n)
}

// refuse counts and logs (rate-limited) a refused request and returns err.
func (b *Backend) refuse(call, reason string, err error) error {
	b.m.refused.WithLabelValues(call, reason).Inc()
	if ok, suppressed := b.lim.Allow(call + "/" + reason); ok {
		b.logger.Warn("vm request refused", "call", call, "reason", reason, "err", err, "suppressed", suppressed)
	}
	return err
}

// persist writes v's record (and its own hugepage bytes) in one
// transaction. limits bounds the hugepage kinds on a new claim.
func (b *Backend) persist(ctx context.Context, rec *record, limits map[string]int64) error {
	rows, err := rec.rows()
	if err != nil {
		return err
	}
	return b.allocs.Claim(context.WithoutCancel(ctx), rec.ID, rows, limits)
}

func (b *Backend) get(id string) (*vmState, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if v, ok := b.vms[id]; ok {
		return v, nil
	}
	return nil, status.Errorf(codes.NotFound, "vm sandbox %q not found", id)
}

func (b *Backend) getContainer(id string) (*vmState, error) {
	b.mu.Lock()
	sid, ok := b.owner[id]
	b.mu.Unlock()
	if !ok {
		return nil, status.Errorf(codes.NotFound, "vm container %q not found", id)
	}
	return b.get(sid)
}

func newID() string {
	var buf [16]byte
	_, _ = rand.Read(buf[:]) // crypto/rand.Read never fails
	return hex.EncodeToString(buf[:])
}

func (b *Backend) sandboxDir(id string) string { return filepath.Join(b.cfg.RunDir, id) }

// Version names the runtime "tether-vm".
func (b *Backend) Version(context.Context, string) (*runtimeapi.VersionResponse, error) {
	return &runtimeapi.VersionResponse{
		Version: "0.1.0", RuntimeName: "tether-vm", RuntimeVersion: "0.1.0", RuntimeApiVersion: "v1",
	}, nil
}

// Status says the runtime is ready (it is, once New returned).
func (b *Backend) Status(context.Context, bool) (*runtimeapi.StatusResponse, error) {
	return &runtimeapi.StatusResponse{Status: &runtimeapi.RuntimeStatus{Conditions: []*runtimeapi.RuntimeCondition{
		{Type: runtimeapi.RuntimeReady, Status: true}, {Type: runtimeapi.NetworkReady, Status: true},
	}}}, nil
}

// RuntimeConfig has nothing to say.
func (b *Backend) RuntimeConfig(context.Context) (*runtimeapi.RuntimeConfigResponse, error) {
	return &runtimeapi.RuntimeConfigResponse{}, nil
}

// UpdateRuntimeConfig is accepted and ignored: VMs have no pod network yet.
func (b *Backend) UpdateRuntimeConfig(context.Context, *runtimeapi.RuntimeConfig) error { return nil }

func unimplemented(what string) error {
	return status.Errorf(codes.Unimplemented, "the vm runtime does not support %s", what)
}

// ExecSync is Unimplemented: there is no agent in the guest.
func (b *Backend) ExecSync(context.Context, string, []string, time.Duration) ([]byte, []byte, error) {
	return nil, nil, unimplemented("exec")
}

// Exec is Unimplemented.
func (b *Backend) Exec(context.Context, *runtimeapi.ExecRequest) (*runtimeapi.ExecResponse, error) {
	return nil, unimplemented("exec")
}

// Attach is Unimplemented.
func (b *Backend) Attach(context.Context, *runtimeapi.AttachRequest) (*runtimeapi.AttachResponse, error) {
	return nil, unimplemented("attach")
}

// PortForward is Unimplemented.
func (b *Backend) PortForward(context.Context, *runtimeapi.PortForwardRequest) (*runtimeapi.PortForwardResponse, error) {
	return nil, unimplemented("port forwarding")
}

// CheckpointContainer is Unimplemented.
func (b *Backend) CheckpointContainer(context.Context, *runtimeapi.CheckpointContainerRequest) error {
	return unimplemented("checkpoints")
}

// GetContainerEvents is Unimplemented: the shim builds the stream from
// Events.
func (b *Backend) GetContainerEvents(context.Context, chan *runtimeapi.ContainerEventResponse, func(runtimeapi.RuntimeService_GetContainerEventsClient)) error {
	return unimplemented("GetContainerEvents (the shim uses Events)")
}

// UpdateContainerResources is Unimplemented: a VM's shape is fixed.
func (b *Backend) UpdateContainerResources(context.Context, string, *runtimeapi.ContainerResources) error {
	return unimplemented("resizing")
}

// UpdatePodSandboxResources is Unimplemented.
func (b *Backend) UpdatePodSandboxResources(context.Context, *runtimeapi.UpdatePodSandboxResourcesRequest) (*runtimeapi.UpdatePodSandboxResourcesResponse, error) {
	return nil, unimplemented("resizing")
}

// ContainerStats is Unimplemented.
func (b *Backend) ContainerStats(context.Context, string) (*runtimeapi.ContainerStats, error) {
	return nil, unimplemented("stats")
}

// ListContainerStats returns none.
func (b *Backend) ListContainerStats(context.Context, *runtimeapi.ContainerStatsFilter) ([]*runtimeapi.ContainerStats, error) {
	return nil, nil
}

// PodSandboxStats is Unimplemented.
func (b *Backend) PodSandboxStats(context.Context, string) (*runtimeapi.PodSandboxStats, error) {
	return nil, unimplemented("stats")
}

// ListPodSandboxStats returns none.
func (b *Backend) ListPodSandboxStats(context.Context, *runtimeapi.PodSandboxStatsFilter) ([]*runtimeapi.PodSandboxStats, error) {
	return nil, nil
}

// ListMetricDescriptors returns none.
func (b *Backend) ListMetricDescriptors(context.Context) ([]*runtimeapi.MetricDescriptor, error) {
	return nil, nil
}

// ListPodSandboxMetrics returns none.
func (b *Backend) ListPodSandboxMetrics(context.Context) ([]*runtimeapi.PodSandboxMetrics, error) {
	return nil, nil
}
