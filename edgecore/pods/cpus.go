package pods

import (
	"context"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/utils/cpuset"

	"github.com/tetheredge/tether/edgecore/resources"
)

// The static CPU policy, as kubelet's CPU manager "static" policy: an app
// container of a Guaranteed pod whose cpu is a whole number of cores gets
// that many cores of its own from the node's resource pool (the same pool
// that dedicates cores to VMs, so the two never overlap), and every other
// container the pool's shared set, as its CRI CpusetCpus. When dedicated
// cores come or go, the pool tells the manager, which moves the running
// shared containers with UpdateContainerResources (only CpusetCpus set,
// as kubelet does); the relist does the same as a safety net. A
// container's cores are released when its pod's sandbox is removed.
//
// Pods with a runtime class (VM pods) are left alone: their runtime
// asks the pool itself. Init containers run on the shared set (kubelet
// gives them exclusive cores and reuses those for the app containers;
// this does not).

// CPUPool is the node's resource pool as the static CPU policy uses it;
// *resources.Pool implements it.
type CPUPool interface {
	Allocate(ctx context.Context, req resources.Request) (resources.Grant, error)
	Release(ctx context.Context, owner string) error
	SharedCPUs(ctx context.Context) ([]int, error)
	Subscribe(f func(shared []int)) (cancel func())
}

// annotationCPUs marks a container's cpuset as "exclusive" or "shared";
// the shared ones follow the shared set.
const annotationCPUs = "tether.io/cpus"

// cpuOwner is the allocation owner of a container's exclusive cores.
func cpuOwner(podUID, container string) string { return "pod/" + podUID + "/" + container }

// PodOfCPUOwner is the pod UID of an allocation owner of a container's
// exclusive cores; ok is false for other owners (a VM sandbox id).
func PodOfCPUOwner(owner string) (podUID string, ok bool) {
	rest, ok := strings.CutPrefix(owner, "pod/")
	if !ok {
		return "", false
	}
	podUID, _, ok = strings.Cut(rest, "/")
	return podUID, ok && podUID != ""
}

// exclusiveCPUs is how many cores c of pod gets of its own: its cpu
// request when the pod is Guaranteed, has no runtime class, and the
// request is a whole number; else 0.
func exclusiveCPUs(pod *corev1.Pod, c *corev1.Container) int {
	if rc := pod.Spec.RuntimeClassName; rc != nil && *rc != "" {
		return 0
	}
	if !guaranteed(pod) {
		return 0
	}
	q := containerRequests(c)[corev1.ResourceCPU]
	if q.MilliValue()%1000 != 0 {
		return 0
	}
	return int(q.Value())
}

// guaranteed is the Guaranteed QoS class: every container has cpu and
// memory limits, and requests equal to them (a missing request defaults
// to the limit).
func guaranteed(pod *corev1.Pod) bool {
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for i := range cs {
			req, lim := containerRequests(&cs[i]), cs[i].Resources.Limits
			for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
				l, ok := lim[name]
				if !ok || l.IsZero() {
					return false
				}
				if r := req[name]; r.Cmp(l) != 0 {
					return false
				}
			}
		}
	}
	return true
}

// assignCPUs sets cfg's cpuset: c's own cores, or the shared set.
func (m *Manager) assignCPUs(ctx context.Context, pod *corev1.Pod, c *corev1.Container, cfg *runtimeapi.ContainerConfig) error {
	pool := m.cfg.StaticCPUs
	kind, cpus := "shared", []int(nil)
	isInit := slices.ContainsFunc(pod.Spec.InitContainers, func(ic corev1.Container) bool { return ic.Name == c.Name })
	if n := exclusiveCPUs(pod, c); n > 0 && !isInit {
		g, err := pool.Allocate(ctx, resources.Request{Owner: cpuOwner(string(pod.UID), c.Name), DedicatedCPUs: n})
		if err != nil {
			return fmt.Errorf("allocate %d cpus: %w", n, err)
		}
		kind, cpus = "exclusive", g.CPUs
	} else {
		var err error
		if cpus, err = pool.SharedCPUs(ctx); err != nil {
			return fmt.Errorf("read shared cpus: %w", err)
		}
	}
	cfg.Annotations[annotationCPUs] = kind
	cfg.Linux.Resources.CpusetCpus = cpuset.New(cpus...).String()
	return nil
}

// releaseCPUs gives back the exclusive cores of a removed sandbox's
// containers.
func (m *Manager) releaseCPUs(ctx context.Context, podUID string, cs []*runtimeapi.Container) error {
	if m.cfg.StaticCPUs == nil {
		return nil
	}
	for _, c := range cs {
		if c.GetAnnotations()[annotationCPUs] != "exclusive" {
			continue
		}
		if err := m.cfg.StaticCPUs.Release(ctx, cpuOwner(podUID, c.GetMetadata().GetName())); err != nil {
			return fmt.Errorf("release cpus of container %s: %w", c.GetMetadata().GetName(), err)
		}
	}
	return nil
}

// cpuLoop moves the running shared containers onto the shared set
// whenever the pool says it changed, and at every tick of resync (the
// relist's period).
func (m *Manager) cpuLoop(ctx context.Context, resync <-chan struct{}) error {
	changed := make(chan struct{}, 1)
	cancel := m.cfg.StaticCPUs.Subscribe(func([]int) {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	defer cancel()
	applied := map[string]string{} // container id -> cpuset last set
	for {
		m.moveShared(ctx, applied)
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-resync:
		}
	}
}

func (m *Manager) moveShared(ctx context.Context, applied map[string]string) {
	shared, err := m.cfg.StaticCPUs.SharedCPUs(ctx)
	if err != nil {
		m.cpuFailure("read shared cpus", err)
		return
	}
	set := cpuset.New(shared...).String()
	cs, err := m.rt.ListContainers(ctx, &runtimeapi.ContainerFilter{
		State: &runtimeapi.ContainerStateValue{State: runtimeapi.ContainerState_CONTAINER_RUNNING},
	})
	if err != nil {
		m.cpuFailure("list containers", err)
		return
	}
	running := make(map[string]bool, len(cs))
	for _, c := range cs {
		running[c.GetId()] = true
		if c.GetAnnotations()[annotationCPUs] != "shared" || applied[c.GetId()] == set {
			continue
		}
		err := m.rt.UpdateContainerResources(ctx, c.GetId(), &runtimeapi.ContainerResources{
			Linux: &runtimeapi.LinuxContainerResources{CpusetCpus: set},
		})
		if err != nil {
			m.cpuFailure("update container cpuset", err)
			continue
		}
		applied[c.GetId()] = set
	}
	for id := range applied {
		if !running[id] {
			delete(applied, id)
		}
	}
}

func (m *Manager) cpuFailure(what string, err error) {
	if ok, suppressed := m.lim.Allow("cpus: " + what); ok {
		m.logger.Warn("shared cpuset not applied; retried at the next relist", "step", what, "err", err, "suppressed", suppressed)
	}
}
