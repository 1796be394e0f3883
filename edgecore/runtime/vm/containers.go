package vm

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/cri"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qemu"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qmp"
)

// CreateContainer prepares the guest: it resolves the image, makes the
// sandbox's overlay (once per sandbox) and the QEMU spec. A sandbox runs
// one guest: a second container while one is not exited is refused
// (FailedPrecondition); after an exit, a new container is the guest
// booted again on the same disk.
func (b *Backend) CreateContainer(ctx context.Context, sandboxID string, cfg *runtimeapi.ContainerConfig, _ *runtimeapi.PodSandboxConfig) (string, error) {
	begin := time.Now()
	v, err := b.get(sandboxID)
	if err != nil {
		return "", err
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	rec := v.rec
	live, ready := rec.live(), rec.State == stateReady
	v.mu.Unlock()
	switch {
	case !ready:
		return "", b.refuse("CreateContainer", "sandbox_stopped", status.Errorf(codes.FailedPrecondition, "vm sandbox %s is stopped", sandboxID))
	case live != nil:
		return "", b.refuse("CreateContainer", "second_container", status.Errorf(codes.FailedPrecondition,
			"vm sandbox %s already runs its guest in container %s (one container per VM)", sandboxID, live.ID))
	}
	img, err := b.cfg.Images.Get(cfg.GetImage().GetImage())
	if err != nil {
		return "", b.refuse("CreateContainer", "image", status.Errorf(codes.NotFound, "resolve image: %v", err))
	}
	overlay := rec.Overlay
	tOverlay := time.Now()
	if overlay == "" || rec.Image != img.Name {
		// A new base (the pod's image changed) is a new disk.
		overlay = filepath.Join(rec.Dir, "disk.qcow2")
		if err := os.Remove(overlay); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", status.Errorf(codes.Internal, "remove the old disk: %v", err)
		}
		if err := b.diskFor(ctx, img, overlay, rec.Params.DiskSize); err != nil {
			if errors.Is(err, ErrImageInvalid) {
				return "", b.refuse("CreateContainer", "disk_size", status.Errorf(codes.InvalidArgument, "annotation %s: %v", AnnotationDiskSize, err))
			}
			return "", status.Errorf(codes.Internal, "create the vm's disk: %v", err)
		}
	}
	tSeed := time.Now()
	seed, err := b.seed(rec)
	if err != nil {
		return "", status.Errorf(codes.Internal, "make the cloud-init seed: %v", err)
	}
	logPath := ""
	if cfg.GetLogPath() != "" && rec.LogDir != "" {
		logPath = filepath.Join(rec.LogDir, cfg.GetLogPath())
	} else {
		logPath = filepath.Join(rec.Dir, "console.log")
	}
	c := &container{
		ID: newID() + newID(), Name: cfg.GetMetadata().GetName(), Attempt: cfg.GetMetadata().GetAttempt(),
		Image: img.Name, ImageRef: img.Digest, Labels: maps.Clone(cfg.GetLabels()), Annotations: maps.Clone(cfg.GetAnnotations()),
		LogPath: logPath, State: stateCreated, CreatedAt: time.Now().UnixNano(),
	}
	c.Spec = b.spec(rec, c, img, overlay)
	c.Spec.Seed = seed
	v.mu.Lock()
	rec.Overlay, rec.Image = overlay, img.Name
	rec.Containers = append(rec.Containers, c)
	v.mu.Unlock()
	tRecord := time.Now()
	if err := b.persistState(ctx, v); err != nil {
		v.mu.Lock()
		rec.Containers = rec.Containers[:len(rec.Containers)-1]
		v.mu.Unlock()
		return "", status.Errorf(codes.Unavailable, "record vm container: %v", err)
	}
	b.mu.Lock()
	b.owner[c.ID] = sandboxID
	b.mu.Unlock()
	now := time.Now()
	b.logger.Info("vm container created", "sandbox", sandboxID, "container", c.ID, "took", now.Sub(begin),
		"overlay_time", tSeed.Sub(tOverlay), "seed_spec_time", tRecord.Sub(tSeed), "record_time", now.Sub(tRecord))
	return c.ID, nil
}

// seed makes the sandbox's NoCloud seed from its user data, once; "" when
// the VM has none.
func (b *Backend) seed(rec *record) (string, error) {
	userData, err := os.ReadFile(filepath.Join(rec.Dir, "user-data"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	path := filepath.Join(rec.Dir, "seed.iso")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	host := cmp.Or(rec.Params.Name, rec.Name)
	return path, writeSeed(path, rec.ID, host, string(userData), time.Now())
}

// spec is the QEMU of container c of rec.
func (b *Backend) spec(rec *record, c *container, img Image, overlay string) qemu.Spec {
	s := qemu.Spec{
		Name: "tether-" + rec.ID[:12], Dir: rec.Dir, VCPUs: rec.Params.VCPUs, MemoryBytes: rec.Params.MemoryBytes,
		Disk: overlay, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline,
		SerialLog: rawConsolePath(rec.Dir, c.ID), Accel: b.cfg.Accel, HugepageDir: rec.HugepageDir,
	}
	if s.Kernel != "" && s.Cmdline == "" {
		s.Cmdline = "console=ttyS0"
	}
	if g := rec.Grant; g != nil {
		s.DedicatedCPUs, s.SharedCPUs = g.CPUs, g.SharedCPUs
		if g.HugepageDir != "" {
			s.HugepageDir = g.HugepageDir
		}
		for _, vf := range g.VFs {
			s.VFIO = append(s.VFIO, vf.Address)
		}
	}
	return s
}

// StartContainer starts QEMU and the guest. The start is reported as an
// event; the boot marker, when seen, is reported as a second start event.
func (b *Backend) StartContainer(ctx context.Context, id string) error {
	v, err := b.getContainer(id)
	if err != nil {
		return err
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	c := v.rec.container(id)
	st := c.State
	spec, logPath := c.Spec, c.LogPath
	v.mu.Unlock()
	if st != stateCreated {
		return status.Errorf(codes.FailedPrecondition, "vm container %s is %s, not created", id, st)
	}
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return status.Errorf(codes.Internal, "create the console's directory: %v", err)
	}
	start := time.Now()
	m, err := qemu.Start(ctx, spec, qemu.Options{Binary: b.cfg.QEMU, Logger: b.logger})
	if err != nil {
		v.mu.Lock()
		c.State, c.FinishedAt, c.ExitCode, c.Reason, c.Message = stateExited, time.Now().UnixNano(), 128, "StartError", err.Error()
		v.mu.Unlock()
		return errors.Join(status.Errorf(codes.Unknown, "start qemu: %v", err), b.persistState(ctx, v))
	}
	v.mu.Lock()
	c.State, c.StartedAt, c.Pid = stateRunning, start.UnixNano(), m.Pid()
	v.machine, v.recorded = m, make(chan struct{})
	v.mu.Unlock()
	if err := b.persistState(ctx, v); err != nil {
		// Unrecorded, the QEMU would be lost at a restart: take it down.
		return errors.Join(status.Errorf(codes.Unavailable, "record vm start: %v", err), m.Kill(), m.Close())
	}
	b.publish(cri.Event{ContainerID: id, Kind: cri.EventStart, At: start})
	b.refill() // the disk it may have taken from the pool, made again now QEMU is up
	b.logger.Info("vm started", "sandbox", v.rec.ID, "container", id, "pid", m.Pid(), "accel", spec.Accel,
		"qemu_start", time.Since(start))
	b.wg.Add(1)
	go b.watch(v, c, m, start)
	return nil
}

func (b *Backend) publish(ev cri.Event) {
	if dropped := b.events.Publish(ev); dropped > 0 {
		if ok, suppressed := b.lim.Allow("event_dropped"); ok {
			b.logger.Warn("vm event dropped for slow subscribers", "container_id", ev.ContainerID, "kind", ev.Kind.String(),
				"subscribers", dropped, "suppressed", suppressed)
		}
	}
}

// watch follows one running QEMU until it exits or the backend closes: it
// converts the console into the CRI log, looking for the boot marker
// (consolewatch.go), and turns the exit into the container's exit. It
// leaves QEMU running when the backend closes.
func (b *Backend) watch(v *vmState, c *container, m *qemu.Machine, started time.Time) {
	defer b.wg.Done()
	defer m.Close()
	v.mu.Lock()
	booted := c.BootedAt != 0
	v.mu.Unlock()
	con := &consoleWatch{b: b, v: v, c: c, started: started, booted: booted}
	con.pump(false)
	tick := time.NewTicker(b.cfg.ConsolePoll)
	defer tick.Stop()
	evs := m.Events()
	guestShutdown := false
	for {
		select {
		case <-b.ctx.Done():
			con.close(false)
			return
		case ev, ok := <-evs:
			if !ok {
				evs = nil
				continue
			}
			guestShutdown = guestShutdown || isGuestShutdown(ev)
			b.logger.Debug("qmp event", "container", c.ID, "event", ev.Name)
		case <-tick.C:
			con.pump(false)
		case <-m.Done():
			code := m.ExitCode()
			if code < 0 {
				// An adopted QEMU is not our child: its exit status is
				// lost. QMP's last events say whether the guest shut
				// itself down.
				guestShutdown = guestShutdown || drainShutdown(evs)
				code = exitUnknown
				if guestShutdown {
					code = 0
				}
			}
			con.pump(true)
			con.close(true)
			b.exited(v, c, int32(code), "")
			return
		}
	}
}

// exitUnknown is the exit code of a QEMU whose exit status is lost (an
// adopted one that did not end by a guest shutdown, or one found gone).
const exitUnknown = 255

// isGuestShutdown reports whether ev is QEMU's SHUTDOWN caused by the
// guest (it powered off), not by the host (quit, a signal).
func isGuestShutdown(ev qmp.Event) bool {
	if ev.Name != "SHUTDOWN" {
		return false
	}
	var data struct {
		Guest bool `json:"guest"`
	}
	return json.Unmarshal(ev.Data, &data) == nil && data.Guest
}

// drainShutdown reads the events QEMU sent before it exited, until the
// channel closes (QMP saw the end) or a second passes.
func drainShutdown(evs <-chan qmp.Event) bool {
	if evs == nil {
		return false
	}
	t := time.NewTimer(time.Second)
	defer t.Stop()
	seen := false
	for {
		select {
		case ev, ok := <-evs:
			if !ok {
				return seen
			}
			seen = seen || isGuestShutdown(ev)
		case <-t.C:
			return seen
		}
	}
}

// exited records the end of c's QEMU and reports it.
func (b *Backend) exited(v *vmState, c *container, code int32, reason string) {
	now := time.Now()
	v.mu.Lock()
	if c.State == stateExited {
		v.mu.Unlock()
		return
	}
	if reason == "" {
		reason = "Completed"
		if code != 0 {
			reason = "Error"
		}
	}
	c.State, c.FinishedAt, c.ExitCode, c.Reason = stateExited, now.UnixNano(), code, reason
	c.Console = consoleTail(c.Spec.SerialLog)
	v.machine = nil
	if v.recorded != nil {
		defer close(v.recorded)
		v.recorded = nil
	}
	v.mu.Unlock()
	if err := b.persistState(b.ctx, v); err != nil {
		b.logger.Warn("record vm exit failed", "container", c.ID, "err", err)
	}
	b.logger.Info("vm exited", "container", c.ID, "exit_code", code, "reason", reason)
	b.publish(cri.Event{ContainerID: c.ID, Kind: cri.EventExit, ExitCode: code, At: now})
}

// StopContainer powers the guest down (ACPI), quits QEMU after timeout
// seconds and kills it last.
func (b *Backend) StopContainer(ctx context.Context, id string, timeout int64) error {
	v, err := b.getContainer(id)
	if err != nil {
		return err
	}
	v.op.Lock()
	defer v.op.Unlock()
	return b.stopLive(ctx, v, time.Duration(max(timeout, 0))*time.Second)
}

// stopLive stops the sandbox's running QEMU, if any, and waits for the
// watcher to record the exit. Call with v.op held.
func (b *Backend) stopLive(ctx context.Context, v *vmState, grace time.Duration) error {
	v.mu.Lock()
	m, recorded := v.machine, v.recorded
	c := v.rec.live()
	v.mu.Unlock()
	if m == nil {
		return nil
	}
	ending, err := m.Stop(context.WithoutCancel(ctx), grace)
	if err != nil {
		return status.Errorf(codes.Internal, "stop vm container %s: %v", c.ID, err)
	}
	b.logger.Info("vm stopped", "sandbox", v.rec.ID, "container", c.ID, "ending", string(ending), "grace", grace)
	// The watcher records the exit; wait for it so the caller sees it.
	select {
	case <-recorded:
		return nil
	case <-b.ctx.Done():
		return status.Error(codes.Unavailable, "vm backend closed")
	}
}

// RemoveContainer forgets an exited container (a running one is stopped
// at once first). The sandbox's disk stays until RemovePodSandbox.
func (b *Backend) RemoveContainer(ctx context.Context, id string) error {
	v, err := b.getContainer(id)
	if err != nil {
		return err
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	c := v.rec.container(id)
	isLive := c != nil && c == v.rec.live() && v.machine != nil
	v.mu.Unlock()
	if isLive {
		if err := b.stopLive(ctx, v, 0); err != nil {
			return err
		}
	}
	v.mu.Lock()
	gone := v.rec.container(id)
	kept := v.rec.Containers[:0]
	for _, x := range v.rec.Containers {
		if x.ID != id {
			kept = append(kept, x)
		}
	}
	v.rec.Containers = kept
	v.mu.Unlock()
	if err := b.persistState(ctx, v); err != nil {
		return status.Errorf(codes.Unavailable, "forget vm container %s: %v", id, err)
	}
	if gone != nil {
		b.removeConsole(gone)
	}
	b.mu.Lock()
	delete(b.owner, id)
	b.mu.Unlock()
	return nil
}

// ListContainers lists the guests that match filter.
func (b *Backend) ListContainers(_ context.Context, filter *runtimeapi.ContainerFilter) ([]*runtimeapi.Container, error) {
	var out []*runtimeapi.Container
	for _, v := range b.snapshot() {
		v.mu.Lock()
		for _, c := range v.rec.Containers {
			ct := &runtimeapi.Container{
				Id: c.ID, PodSandboxId: v.rec.ID, Metadata: &runtimeapi.ContainerMetadata{Name: c.Name, Attempt: c.Attempt},
				Image: &runtimeapi.ImageSpec{Image: c.Image, RuntimeHandler: "tether-vm"}, ImageRef: c.ImageRef,
				State: containerState(c), CreatedAt: c.CreatedAt, Labels: maps.Clone(c.Labels), Annotations: maps.Clone(c.Annotations),
			}
			if f := filter; f != nil {
				if (f.GetId() != "" && f.GetId() != ct.Id) || (f.GetPodSandboxId() != "" && f.GetPodSandboxId() != ct.PodSandboxId) ||
					(f.GetState() != nil && f.GetState().GetState() != ct.State) || !labelsMatch(ct.Labels, f.GetLabelSelector()) {
					continue
				}
			}
			out = append(out, ct)
		}
		v.mu.Unlock()
	}
	return out, nil
}

// ContainerStatus reports the guest; verbose adds Info[InfoGuest].
func (b *Backend) ContainerStatus(_ context.Context, id string, verbose bool) (*runtimeapi.ContainerStatusResponse, error) {
	v, err := b.getContainer(id)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	c := v.rec.container(id)
	if c == nil {
		return nil, status.Errorf(codes.NotFound, "vm container %q not found", id)
	}
	resp := &runtimeapi.ContainerStatusResponse{Status: &runtimeapi.ContainerStatus{
		Id: c.ID, Metadata: &runtimeapi.ContainerMetadata{Name: c.Name, Attempt: c.Attempt}, State: containerState(c),
		CreatedAt: c.CreatedAt, StartedAt: c.StartedAt, FinishedAt: c.FinishedAt, ExitCode: c.ExitCode,
		Image: &runtimeapi.ImageSpec{Image: c.Image, RuntimeHandler: "tether-vm"}, ImageRef: c.ImageRef,
		Reason: c.Reason, Message: c.Message, Labels: maps.Clone(c.Labels), Annotations: maps.Clone(c.Annotations),
		LogPath: c.LogPath, ImageId: c.ImageRef,
	}}
	if verbose {
		resp.Info = map[string]string{InfoGuest: guestInfo(c)}
	}
	return resp, nil
}

func containerState(c *container) runtimeapi.ContainerState {
	switch c.State {
	case stateCreated:
		return runtimeapi.ContainerState_CONTAINER_CREATED
	case stateRunning:
		return runtimeapi.ContainerState_CONTAINER_RUNNING
	case stateExited:
		return runtimeapi.ContainerState_CONTAINER_EXITED
	}
	return runtimeapi.ContainerState_CONTAINER_UNKNOWN
}

// adopt loads the records and attaches to every QEMU that still runs; a
// recorded running container whose QEMU is gone is recorded exited, and
// its sandbox lost (lost).
func (b *Backend) adopt(ctx context.Context) error {
	recs, bad, err := loadRecords(ctx, b.allocs)
	if err != nil {
		return fmt.Errorf("load vm records: %w", err)
	}
	for _, err := range bad {
		b.m.refused.WithLabelValues("adopt", "bad_record").Inc()
		b.logger.Warn("vm record skipped", "err", err)
	}
	for _, rec := range recs {
		v := &vmState{rec: rec}
		b.vms[rec.ID] = v
		for _, c := range rec.Containers {
			b.owner[c.ID] = rec.ID
		}
		c := rec.live()
		if c == nil || c.State != stateRunning {
			continue
		}
		m, err := qemu.Attach(ctx, c.Spec, c.Pid, qemu.Options{Binary: b.cfg.QEMU, Logger: b.logger})
		if err != nil {
			b.logger.Warn("recorded vm is gone", "sandbox", rec.ID, "container", c.ID, "pid", c.Pid, "err", err)
			b.drainConsole(v, c)
			b.exited(v, c, exitUnknown, "QEMUGone")
			b.lost(ctx, v)
			continue
		}
		v.machine, v.recorded = m, make(chan struct{})
		b.logger.Info("vm adopted", "sandbox", rec.ID, "container", c.ID, "pid", c.Pid)
		b.wg.Add(1)
		go b.watch(v, c, m, time.Unix(0, c.StartedAt))
	}
	return nil
}

// lost marks the sandbox of a QEMU that died unwatched (the host
// rebooted, or QEMU was killed while EdgeCore was down) NOTREADY and
// releases its cores, hugepages and VFs: the VM is gone with its QEMU, and
// after a reboot so is its directory; the pod manager makes a new sandbox,
// as kubelet does for a sandbox that died. The record stays until
// RemovePodSandbox.
func (b *Backend) lost(ctx context.Context, v *vmState) {
	v.mu.Lock()
	v.rec.State = stateNotReady
	v.mu.Unlock()
	err := b.releaseResources(ctx, v)
	if err == nil {
		err = b.persistState(ctx, v)
	}
	if err != nil {
		b.logger.Warn("release lost vm failed", "sandbox", v.rec.ID, "err", err)
	}
}
