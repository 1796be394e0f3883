package nodestatus

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tetheredge/tether/edgecore/hostinfo"
)

// Eviction signals EvictionHard may name, as kubelet's --eviction-hard.
const (
	SignalMemoryAvailable = "memory.available"
	SignalNodefsAvailable = "nodefs.available"
)

// defaultEvictionHard are kubelet's defaults for the signals that reduce
// allocatable (kubelet's imagefs and inode defaults do not).
var defaultEvictionHard = map[string]string{SignalMemoryAvailable: "100Mi", SignalNodefsAvailable: "10%"}

// threshold is one eviction threshold: an absolute quantity, or a
// fraction of the capacity of its resource.
type threshold struct {
	quantity resource.Quantity
	percent  float64 // used when > 0
}

func (t threshold) of(capacity resource.Quantity) resource.Quantity {
	if t.percent > 0 {
		return *resource.NewQuantity(int64(float64(capacity.Value())*t.percent/100), resource.BinarySI)
	}
	return t.quantity
}

// parseEviction reads EvictionHard (nil: kubelet's defaults) into the
// threshold per resource it reduces.
func parseEviction(in map[string]string) (map[corev1.ResourceName]threshold, error) {
	if in == nil {
		in = defaultEvictionHard
	}
	out := map[corev1.ResourceName]threshold{}
	for signal, v := range in {
		var name corev1.ResourceName
		switch signal {
		case SignalMemoryAvailable:
			name = corev1.ResourceMemory
		case SignalNodefsAvailable:
			name = corev1.ResourceEphemeralStorage
		default:
			return nil, fmt.Errorf("parse eviction threshold %q: signal not supported (want %s or %s)", signal, SignalMemoryAvailable, SignalNodefsAvailable)
		}
		if p, ok := strings.CutSuffix(v, "%"); ok {
			f, err := strconv.ParseFloat(p, 64)
			if err != nil || f < 0 || f > 100 {
				return nil, fmt.Errorf("parse eviction threshold %s=%q: want a percentage from 0 to 100", signal, v)
			}
			out[name] = threshold{percent: f}
			continue
		}
		q, err := resource.ParseQuantity(v)
		if err != nil || q.Sign() < 0 {
			return nil, fmt.Errorf("parse eviction threshold %s=%q: want a non-negative quantity or a percentage", signal, v)
		}
		out[name] = threshold{quantity: q}
	}
	return out, nil
}

// reservable are the resources SystemReserved and KubeReserved may name.
var reservable = []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory, corev1.ResourceEphemeralStorage}

// sumReserved adds the reservations up, refusing other resources and
// negative quantities.
func sumReserved(lists ...corev1.ResourceList) (corev1.ResourceList, error) {
	out := corev1.ResourceList{}
	for _, l := range lists {
		for name, q := range l {
			if !isReservable(name) {
				return nil, fmt.Errorf("reserve %s: only cpu, memory and ephemeral-storage can be reserved", name)
			}
			if q.Sign() < 0 {
				return nil, fmt.Errorf("reserve %s: negative quantity %s", name, q.String())
			}
			sum := out[name]
			sum.Add(q)
			out[name] = sum
		}
	}
	return out, nil
}

func isReservable(name corev1.ResourceName) bool {
	for _, r := range reservable {
		if r == name {
			return true
		}
	}
	return false
}

// ReservedCores counts the whole cores the resource pool keeps from pods
// and VMs.
type ReservedCores struct {
	// System are the reserved system cores (the pool's
	// ReservedSystemCPUs); DataPlane the data-plane cores.
	System, DataPlane int64
}

// reserveCores folds the reserved cores into the reservations: system
// cores replace the cpu reserved by quantity, data-plane cores add to it.
func reserveCores(reserved corev1.ResourceList, cores ReservedCores) (corev1.ResourceList, error) {
	if cores.System < 0 || cores.DataPlane < 0 {
		return nil, fmt.Errorf("reserve cores: negative count %+v", cores)
	}
	if cores.System == 0 && cores.DataPlane == 0 {
		return reserved, nil
	}
	cpu := reserved[corev1.ResourceCPU]
	if cores.System > 0 {
		cpu = *resource.NewQuantity(cores.System, resource.DecimalSI)
	}
	cpu.Add(*resource.NewQuantity(cores.DataPlane, resource.DecimalSI))
	reserved[corev1.ResourceCPU] = cpu
	return reserved, nil
}

// addExtended adds extended resources to capacity (and so, unreduced, to
// allocatable).
func addExtended(capacity corev1.ResourceList, ext map[corev1.ResourceName]int64) error {
	for name, n := range ext {
		if !strings.Contains(string(name), "/") || n < 0 {
			return fmt.Errorf("extended resource %s=%d: want a domain-qualified name and a count >= 0", name, n)
		}
		if _, ok := capacity[name]; ok {
			return fmt.Errorf("extended resource %s: already advertised", name)
		}
		capacity[name] = *resource.NewQuantity(n, resource.DecimalSI)
	}
	return nil
}

// hostResources are the inputs of the Node's capacity.
type hostResources struct {
	facts        hostinfo.Facts
	storageBytes int64
	maxPods      int64
}

// capacity returns the Node's capacity as kubelet reports it: memory is
// MemTotal with the huge pages in it, and each huge page size is its own
// resource (hugepages-2Mi, hugepages-1Gi).
func (h hostResources) capacity() corev1.ResourceList {
	c := corev1.ResourceList{
		corev1.ResourceCPU:              *resource.NewQuantity(h.facts.CPUs, resource.DecimalSI),
		corev1.ResourceMemory:           *resource.NewQuantity(h.facts.MemoryBytes, resource.BinarySI),
		corev1.ResourceEphemeralStorage: *resource.NewQuantity(h.storageBytes, resource.BinarySI),
		corev1.ResourcePods:             *resource.NewQuantity(h.maxPods, resource.DecimalSI),
	}
	for size, bytes := range h.facts.HugePages {
		name := corev1.ResourceName(corev1.ResourceHugePagesPrefix + resource.NewQuantity(size, resource.BinarySI).String())
		c[name] = *resource.NewQuantity(bytes, resource.BinarySI)
	}
	return c
}

// allocatable is capacity less the reservations and eviction thresholds,
// and memory less the huge pages, never below zero: kubelet's arithmetic
// (pkg/kubelet/nodestatus MachineInfo with
// GetNodeAllocatableReservation).
func allocatable(capacity, reserved corev1.ResourceList, eviction map[corev1.ResourceName]threshold) corev1.ResourceList {
	a := corev1.ResourceList{}
	for name, c := range capacity {
		v := c.DeepCopy()
		if r, ok := reserved[name]; ok {
			v.Sub(r)
		}
		if t, ok := eviction[name]; ok {
			v.Sub(t.of(c))
		}
		a[name] = v
	}
	for name, c := range capacity {
		if strings.HasPrefix(string(name), corev1.ResourceHugePagesPrefix) {
			m := a[corev1.ResourceMemory]
			m.Sub(c)
			a[corev1.ResourceMemory] = m
		}
	}
	for name, v := range a {
		if v.Sign() < 0 {
			v.Set(0)
			a[name] = v
		}
	}
	return a
}

// errNotAsked is the runtime's state before the first probe.
var errNotAsked = errors.New("not asked yet")
