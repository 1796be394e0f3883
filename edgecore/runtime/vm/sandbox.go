package vm

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/store"
)

// RunPodSandbox checks the VM's shape (InvalidArgument naming the
// annotation), claims its resources from the pool (or its hugepage bytes
// itself) and records the VM, all or nothing. Nothing runs yet: QEMU starts
// with the container.
func (b *Backend) RunPodSandbox(ctx context.Context, cfg *runtimeapi.PodSandboxConfig, _ string) (string, error) {
	md := cfg.GetMetadata()
	if md.GetName() == "" || md.GetUid() == "" {
		return "", b.refuse("RunPodSandbox", "metadata", status.Error(codes.InvalidArgument, "sandbox metadata needs a name and a uid"))
	}
	p, err := parseParams(cfg.GetAnnotations())
	if err != nil {
		return "", b.refuse("RunPodSandbox", "annotation", err)
	}
	id := newID()
	rec := &record{
		ID: id, Name: md.GetName(), Namespace: md.GetNamespace(), UID: md.GetUid(), Attempt: md.GetAttempt(),
		Labels: maps.Clone(cfg.GetLabels()), Annotations: maps.Clone(cfg.GetAnnotations()),
		LogDir: cfg.GetLogDirectory(), CreatedAt: time.Now().UnixNano(), State: stateReady, Params: p,
		Dir: b.sandboxDir(id),
	}
	delete(rec.Annotations, AnnotationUserData) // in Dir/user-data
	if rows, err := rec.rows(); err != nil || len(rows[0].Detail) > store.MaxAllocationDetail {
		return "", b.refuse("RunPodSandbox", "annotation", status.Errorf(codes.InvalidArgument,
			"the sandbox's labels and annotations (user data aside) exceed the VM record's %d bytes", store.MaxAllocationDetail))
	}
	if err := os.MkdirAll(rec.Dir, 0o750); err != nil {
		return "", fmt.Errorf("create vm directory: %w", err)
	}
	if p.UserData != "" {
		if err := os.WriteFile(filepath.Join(rec.Dir, "user-data"), []byte(p.UserData), 0o600); err != nil {
			return "", errors.Join(fmt.Errorf("write user data: %w", err), os.RemoveAll(rec.Dir))
		}
	}
	tClaim := time.Now()
	if err := b.claim(ctx, rec); err != nil {
		return "", errors.Join(err, os.RemoveAll(rec.Dir))
	}
	took := time.Since(tClaim)
	b.mu.Lock()
	b.vms[id] = &vmState{rec: rec}
	b.mu.Unlock()
	b.logger.Info("vm sandbox created", "sandbox", id, "pod", rec.Namespace+"/"+rec.Name, "vm", p.Name,
		"vcpus", p.VCPUs, "memory_bytes", p.MemoryBytes, "dedicated_cpus", p.DedicatedCPUs,
		"record_time", took, "took", time.Since(time.Unix(0, rec.CreatedAt)))
	return id, nil
}

// claim takes what rec's shape needs and writes the record. Without a
// pool, dedicated CPUs and VFs are FailedPrecondition; hugepages come from
// the configured hugetlbfs mount, accounted in the record's transaction
// against the kernel's page count. With a pool, a record that cannot be
// written releases the grant again.
func (b *Backend) claim(ctx context.Context, rec *record) error {
	p := rec.Params
	if b.cfg.Pool == nil {
		var missing []string
		if p.DedicatedCPUs {
			missing = append(missing, "dedicated CPUs ("+AnnotationDedicatedCPUs+")")
		}
		if len(p.VFs) > 0 {
			missing = append(missing, "SR-IOV VFs ("+AnnotationSRIOV+")")
		}
		if len(missing) > 0 {
			return b.refuse("RunPodSandbox", "no_pool", status.Errorf(codes.FailedPrecondition,
				"this node has no resource pool configured, so it cannot give %s", strings.Join(missing, " or ")))
		}
		var limits map[string]int64
		if p.HugepageSize != 0 {
			size := hugepageKind(p.HugepageSize)
			dir := b.cfg.HugepageDirs[strings.TrimPrefix(size, "hugepages-")]
			if dir == "" {
				return b.refuse("RunPodSandbox", "no_hugetlbfs", status.Errorf(codes.FailedPrecondition,
					"no hugetlbfs mount of %s pages is configured on this node", strings.TrimPrefix(size, "hugepages-")))
			}
			limit, err := hugepagesTotal(b.cfg.SysfsRoot, p.HugepageSize)
			if err != nil {
				return status.Errorf(codes.FailedPrecondition, "read the node's hugepages: %v", err)
			}
			rec.HugepageDir, rec.HugepageBytes = dir, p.MemoryBytes
			limits = map[string]int64{size: limit}
		}
		if err := b.persist(ctx, rec, limits); err != nil {
			if errors.Is(err, store.ErrInsufficient) {
				return b.refuse("RunPodSandbox", "insufficient", status.Errorf(codes.ResourceExhausted, "claim hugepages: %v", err))
			}
			return status.Errorf(codes.Unavailable, "record vm: %v", err)
		}
		return nil
	}
	req := resources.Request{Owner: rec.ID, VFs: p.VFs}
	if p.DedicatedCPUs {
		req.DedicatedCPUs = p.VCPUs
	}
	if p.HugepageSize != 0 {
		req.HugepageSize, req.HugepageBytes = p.HugepageSize, p.MemoryBytes
	}
	g, err := b.cfg.Pool.Allocate(ctx, req)
	if err != nil {
		var ie *resources.InsufficientError
		if errors.As(err, &ie) {
			return b.refuse("RunPodSandbox", "insufficient", status.Errorf(codes.ResourceExhausted, "allocate: %v", err))
		}
		return status.Errorf(codes.Unavailable, "allocate: %v", err)
	}
	rec.Grant = &g
	if err := b.persist(ctx, rec, nil); err != nil {
		return errors.Join(status.Errorf(codes.Unavailable, "record vm: %v", err), b.cfg.Pool.Release(context.WithoutCancel(ctx), rec.ID))
	}
	return nil
}

// hugepagesTotal is the bytes of hugepages of size the kernel has reserved.
func hugepagesTotal(sysfs string, size int64) (int64, error) {
	p := filepath.Join(sysfs, "kernel", "mm", "hugepages", fmt.Sprintf("hugepages-%dkB", size>>10), "nr_hugepages")
	data, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", p, err)
	}
	return n * size, nil
}

// releaseResources gives back what the sandbox holds of the node (not its
// record): the pool's grant, or its own hugepage bytes. Call with v.op held.
func (b *Backend) releaseResources(ctx context.Context, v *vmState) error {
	v.mu.Lock()
	rec := v.rec
	held := rec.Grant != nil || rec.HugepageBytes != 0
	v.mu.Unlock()
	if !held {
		return nil
	}
	if rec.Grant != nil && b.cfg.Pool != nil {
		if err := b.cfg.Pool.Release(context.WithoutCancel(ctx), rec.ID); err != nil {
			return fmt.Errorf("release the pool's grant: %w", err)
		}
	}
	v.mu.Lock()
	rec.Grant, rec.HugepageBytes = nil, 0
	v.mu.Unlock()
	// Written again whole: the pool's release may have taken every row of
	// the owner.
	return b.persistState(ctx, v)
}

// persistState writes v's record as it is now.
func (b *Backend) persistState(ctx context.Context, v *vmState) error {
	v.mu.Lock()
	rows, err := v.rec.rows()
	id := v.rec.ID
	v.mu.Unlock()
	if err != nil {
		return err
	}
	return b.allocs.Claim(context.WithoutCancel(ctx), id, rows, nil)
}

// StopPodSandbox stops the guest (at once: the pod manager has stopped the
// container with its grace period first) and gives back the cores,
// hugepages and VFs. The record stays until RemovePodSandbox.
func (b *Backend) StopPodSandbox(ctx context.Context, id string) error {
	v, err := b.get(id)
	if err != nil {
		return err
	}
	v.op.Lock()
	defer v.op.Unlock()
	if err := b.stopLive(ctx, v, 0); err != nil {
		return err
	}
	v.mu.Lock()
	v.rec.State = stateNotReady
	v.mu.Unlock()
	if err := b.releaseResources(ctx, v); err != nil {
		return status.Errorf(codes.Unavailable, "stop vm sandbox %s: %v", id, err)
	}
	return nil
}

// RemovePodSandbox stops and forgets the sandbox: QEMU, overlay, user
// data, resources and record go. Removing an unknown sandbox is NotFound.
func (b *Backend) RemovePodSandbox(ctx context.Context, id string) error {
	v, err := b.get(id)
	if err != nil {
		return err
	}
	v.op.Lock()
	defer v.op.Unlock()
	if err := b.stopLive(ctx, v, 0); err != nil {
		return err
	}
	if err := b.releaseResources(ctx, v); err != nil {
		return status.Errorf(codes.Unavailable, "remove vm sandbox %s: %v", id, err)
	}
	if err := os.RemoveAll(v.rec.Dir); err != nil {
		return status.Errorf(codes.Internal, "remove vm directory: %v", err)
	}
	if err := b.allocs.Release(context.WithoutCancel(ctx), id); err != nil {
		return status.Errorf(codes.Unavailable, "forget vm %s: %v", id, err)
	}
	b.mu.Lock()
	delete(b.vms, id)
	for _, c := range v.rec.Containers {
		delete(b.owner, c.ID)
	}
	b.mu.Unlock()
	b.logger.Info("vm sandbox removed", "sandbox", id, "pod", v.rec.Namespace+"/"+v.rec.Name)
	return nil
}

// PodSandboxStatus reports the sandbox; VMs have no pod network yet.
func (b *Backend) PodSandboxStatus(_ context.Context, id string, _ bool) (*runtimeapi.PodSandboxStatusResponse, error) {
	v, err := b.get(id)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	r := v.rec
	return &runtimeapi.PodSandboxStatusResponse{Status: &runtimeapi.PodSandboxStatus{
		Id: r.ID, Metadata: sandboxMetadata(r), State: sandboxState(r), CreatedAt: r.CreatedAt,
		Labels: maps.Clone(r.Labels), Annotations: maps.Clone(r.Annotations), RuntimeHandler: "tether-vm",
		Linux: &runtimeapi.LinuxPodSandboxStatus{Namespaces: &runtimeapi.Namespace{Options: &runtimeapi.NamespaceOption{}}},
	}}, nil
}

// ListPodSandbox lists the VM sandboxes that match filter.
func (b *Backend) ListPodSandbox(_ context.Context, filter *runtimeapi.PodSandboxFilter) ([]*runtimeapi.PodSandbox, error) {
	var out []*runtimeapi.PodSandbox
	for _, v := range b.snapshot() {
		v.mu.Lock()
		r := v.rec
		sb := &runtimeapi.PodSandbox{
			Id: r.ID, Metadata: sandboxMetadata(r), State: sandboxState(r), CreatedAt: r.CreatedAt,
			Labels: maps.Clone(r.Labels), Annotations: maps.Clone(r.Annotations), RuntimeHandler: "tether-vm",
		}
		v.mu.Unlock()
		if f := filter; f != nil {
			if (f.GetId() != "" && f.GetId() != sb.Id) || (f.GetState() != nil && f.GetState().GetState() != sb.State) ||
				!labelsMatch(sb.Labels, f.GetLabelSelector()) {
				continue
			}
		}
		out = append(out, sb)
	}
	return out, nil
}

func (b *Backend) snapshot() []*vmState {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]*vmState, 0, len(b.vms))
	for _, v := range b.vms {
		out = append(out, v)
	}
	return out
}

func labelsMatch(labels, selector map[string]string) bool {
	for k, want := range selector {
		if labels[k] != want {
			return false
		}
	}
	return true
}

func sandboxMetadata(r *record) *runtimeapi.PodSandboxMetadata {
	return &runtimeapi.PodSandboxMetadata{Name: r.Name, Namespace: r.Namespace, Uid: r.UID, Attempt: r.Attempt}
}

func sandboxState(r *record) runtimeapi.PodSandboxState {
	if r.State == stateReady {
		return runtimeapi.PodSandboxState_SANDBOX_READY
	}
	return runtimeapi.PodSandboxState_SANDBOX_NOTREADY
}
