package vm

import (
	"fmt"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tetheredge/tether/edgecore/resources"
)

// The sandbox annotations that shape a VM. The VM controller puts them on
// the pod it makes of a VirtualMachine; the pod manager copies the pod's
// annotations into PodSandboxConfig.Annotations (docs/runtime.md,
// "Virtual machines (edge)").
const (
	AnnotationName          = "vm.edge.tether.dev/name"
	AnnotationVCPUs         = "vm.edge.tether.dev/vcpus"
	AnnotationMemory        = "vm.edge.tether.dev/memory"
	AnnotationHugepageSize  = "vm.edge.tether.dev/hugepage-size"
	AnnotationDedicatedCPUs = "vm.edge.tether.dev/dedicated-cpus"
	AnnotationSRIOV         = "vm.edge.tether.dev/sriov"
	AnnotationDiskSize      = "vm.edge.tether.dev/disk-size"
	AnnotationUserData      = "vm.edge.tether.dev/user-data"
)

// Bounds of a VM's shape.
const (
	MaxVCPUs     = 256
	MinMemory    = 16 << 20
	MaxUserData  = 64 << 10
	maxPoolName  = 63
	maxVFsInPool = 64
)

// params is a VM's shape, from its sandbox annotations.
type params struct {
	Name          string         `json:"name,omitempty"`
	VCPUs         int            `json:"vcpus"`
	MemoryBytes   int64          `json:"memoryBytes"`
	HugepageSize  int64          `json:"hugepageSize,omitempty"`
	DedicatedCPUs bool           `json:"dedicatedCPUs,omitempty"`
	VFs           map[string]int `json:"vfs,omitempty"`
	DiskSize      int64          `json:"diskSize,omitempty"`
	// UserData is not kept in the record (it can be 64 KiB, the record's
	// limit): the sandbox directory holds it.
	UserData string `json:"-"`
}

// badAnnotation is the InvalidArgument error of annotation key.
func badAnnotation(key, format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, "annotation %s: %s", key, fmt.Sprintf(format, args...))
}

// parseParams reads and checks a VM's shape. Every error is
// InvalidArgument and names the annotation.
func parseParams(ann map[string]string) (params, error) {
	var p params
	p.Name = ann[AnnotationName]
	v, ok := ann[AnnotationVCPUs]
	if !ok {
		return p, badAnnotation(AnnotationVCPUs, "required (an integer from 1 to %d)", MaxVCPUs)
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > MaxVCPUs {
		return p, badAnnotation(AnnotationVCPUs, "%q is not an integer from 1 to %d", v, MaxVCPUs)
	}
	p.VCPUs = n
	if p.MemoryBytes, err = quantity(ann, AnnotationMemory, true); err != nil {
		return p, err
	}
	if p.MemoryBytes < MinMemory || p.MemoryBytes%(1<<20) != 0 {
		return p, badAnnotation(AnnotationMemory, "%q: guest memory is a whole number of MiB, at least 16Mi", ann[AnnotationMemory])
	}
	switch v := ann[AnnotationHugepageSize]; v {
	case "":
	case "2Mi":
		p.HugepageSize = resources.Hugepage2Mi
	case "1Gi":
		p.HugepageSize = resources.Hugepage1Gi
	default:
		return p, badAnnotation(AnnotationHugepageSize, "%q is not one of \"\", \"2Mi\", \"1Gi\"", v)
	}
	if p.HugepageSize != 0 && p.MemoryBytes%p.HugepageSize != 0 {
		return p, badAnnotation(AnnotationMemory, "%s is not a whole number of %s hugepages", ann[AnnotationMemory], ann[AnnotationHugepageSize])
	}
	switch v := ann[AnnotationDedicatedCPUs]; v {
	case "", "false":
	case "true":
		p.DedicatedCPUs = true
	default:
		return p, badAnnotation(AnnotationDedicatedCPUs, "%q is not \"true\" or \"false\"", v)
	}
	if p.VFs, err = parseSRIOV(ann[AnnotationSRIOV]); err != nil {
		return p, err
	}
	if p.DiskSize, err = quantity(ann, AnnotationDiskSize, false); err != nil {
		return p, err
	}
	p.UserData = ann[AnnotationUserData]
	if len(p.UserData) > MaxUserData {
		return p, badAnnotation(AnnotationUserData, "%d bytes, limit %d", len(p.UserData), MaxUserData)
	}
	return p, nil
}

// quantity parses a positive byte quantity; an absent optional one is 0.
func quantity(ann map[string]string, key string, required bool) (int64, error) {
	v, ok := ann[key]
	if !ok || v == "" {
		if required {
			return 0, badAnnotation(key, "required (a quantity such as 512Mi)")
		}
		return 0, nil
	}
	q, err := resource.ParseQuantity(v)
	if err != nil {
		return 0, badAnnotation(key, "%q is not a quantity: %v", v, err)
	}
	b, ok := q.AsInt64()
	if !ok || b <= 0 {
		return 0, badAnnotation(key, "%q is not a positive whole number of bytes", v)
	}
	return b, nil
}

// parseSRIOV reads "pool-a=1,pool-b=2".
func parseSRIOV(v string) (map[string]int, error) {
	if v == "" {
		return nil, nil
	}
	out := map[string]int{}
	for part := range strings.SplitSeq(v, ",") {
		pool, count, ok := strings.Cut(strings.TrimSpace(part), "=")
		n, err := strconv.Atoi(count)
		switch {
		case !ok || pool == "" || len(pool) > maxPoolName:
			return nil, badAnnotation(AnnotationSRIOV, "%q is not POOL=COUNT", part)
		case err != nil || n < 1 || n > maxVFsInPool:
			return nil, badAnnotation(AnnotationSRIOV, "%q: the count is an integer from 1 to %d", part, maxVFsInPool)
		case out[pool] != 0:
			return nil, badAnnotation(AnnotationSRIOV, "pool %q named twice", pool)
		}
		out[pool] = n
	}
	return out, nil
}

// hugepageKind is the Kubernetes resource name of a page size, which is
// also the allocation kind of hugepage bytes.
func hugepageKind(size int64) string {
	if size == resources.Hugepage1Gi {
		return "hugepages-1Gi"
	}
	return "hugepages-2Mi"
}
