package vm

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
)

// The contract with the edge's VM runtime (issue 9): the pod's annotations,
// copied by the pods manager into the CRI sandbox's annotations.
const (
	AnnotationName          = "vm.edge.tether.dev/name"
	AnnotationVCPUs         = "vm.edge.tether.dev/vcpus"
	AnnotationMemory        = "vm.edge.tether.dev/memory"
	AnnotationHugepageSize  = "vm.edge.tether.dev/hugepage-size"
	AnnotationDedicatedCPUs = "vm.edge.tether.dev/dedicated-cpus"
	AnnotationSRIOV         = "vm.edge.tether.dev/sriov"
	AnnotationDiskSize      = "vm.edge.tether.dev/disk-size"
	AnnotationUserData      = "vm.edge.tether.dev/user-data"
	// AnnotationSpecHash is the controller's own: a digest of everything
	// else it put in the pod, to tell that the VM's spec changed since the
	// pod was made (pods are immutable; see RestartRequired).
	AnnotationSpecHash = "vm.edge.tether.dev/spec-hash"
)

// LabelName is set on every VM pod to the VM's name; the controller's
// pod informer watches only pods with this label.
const LabelName = AnnotationName

// RuntimeClassName is the VM pods' RuntimeClass (build/runtimeclass-vm.yaml).
const RuntimeClassName = "tether-vm"

// ContainerName is the pod's one container; its image is the VM's base
// image name.
const ContainerName = "compute"

// SRIOVResourcePrefix prefixes the extended resource of a VF pool.
const SRIOVResourcePrefix = "sriov.edge.tether.dev/"

// Bounds of a spec, the same as the CRD's.
const (
	MaxVCPUs     = 128
	MaxUserData  = 64 << 10
	MaxSRIOV     = 8
	MaxVFs       = 64
	MaxNameLen   = 63
	minMemory    = 16 << 20
	maxMemory    = 1 << 40
	mib          = 1 << 20
	podNamePrefx = "vm-"
)

// QEMU's memory overhead, added to the pod's memory request and limit on
// top of guest RAM (or instead of it, when huge pages back guest RAM: they
// are requested as hugepages-<size>). It is an estimate after KubeVirt's:
// a fixed part (QEMU's code, devices, the serial console and QMP buffers,
// DefaultBaseOverhead unless Config.BaseOverhead says otherwise), a part
// per vCPU (thread stacks and per-CPU state, and TCG's per-CPU structures)
// and the guest's page tables (1/512 of guest RAM), rounded up to a MiB.
const (
	DefaultBaseOverhead = 64 << 20
	perVCPUOverhead     = 8 << 20
)

var imageName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// PodName is the name of VM name's pod.
func PodName(vmName string) string { return podNamePrefx + vmName }

// parsed is a validated spec.
type parsed struct {
	memory   resource.Quantity // guest RAM
	pageSize resource.Quantity // zero: no huge pages
	disk     *resource.Quantity
	sriov    []SRIOV // sorted by pool
}

// Validate checks a VM: what the CRD's schema checks, again, and what it
// cannot. The error says what is wrong, in terms of the spec's fields.
func Validate(v *VirtualMachine) error {
	_, err := parse(v)
	return err
}

func parse(v *VirtualMachine) (*parsed, error) {
	s := &v.Spec
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if len(v.Name) > MaxNameLen {
		bad("name is %d characters, at most %d", len(v.Name), MaxNameLen)
	}
	if s.Image == "" || len(s.Image) > 128 || !imageName.MatchString(s.Image) {
		bad("spec.image %q is not a base image name (letters, digits, '.', '_', '-'; at most 128)", s.Image)
	}
	if s.VCPUs < 1 || s.VCPUs > MaxVCPUs {
		bad("spec.vcpus %d is not between 1 and %d", s.VCPUs, MaxVCPUs)
	}
	p := &parsed{}
	mem, err := resource.ParseQuantity(s.Memory)
	switch {
	case err != nil:
		bad("spec.memory %q is not a quantity: %w", s.Memory, err)
	case mem.Cmp(*resource.NewQuantity(minMemory, resource.BinarySI)) < 0 || mem.Cmp(*resource.NewQuantity(maxMemory, resource.BinarySI)) >= 0:
		bad("spec.memory %s is not between 16Mi and 1Ti", s.Memory)
	case mem.Value()%mib != 0:
		bad("spec.memory %s is not a whole number of MiB", s.Memory)
	default:
		p.memory = mem
	}
	switch s.HugepageSize {
	case "":
	case "2Mi", "1Gi":
		p.pageSize = resource.MustParse(s.HugepageSize)
		if !p.memory.IsZero() && p.memory.Value()%p.pageSize.Value() != 0 {
			bad("spec.memory %s is not a whole number of %s huge pages", s.Memory, s.HugepageSize)
		}
	default:
		bad("spec.hugepageSize %q is not \"\", \"2Mi\" or \"1Gi\"", s.HugepageSize)
	}
	if s.DiskSize != "" {
		d, err := resource.ParseQuantity(s.DiskSize)
		if err != nil || d.Sign() <= 0 {
			bad("spec.diskSize %q is not a positive quantity", s.DiskSize)
		} else {
			p.disk = &d
		}
	}
	if len(s.SRIOV) > MaxSRIOV {
		bad("spec.sriov has %d pools, at most %d", len(s.SRIOV), MaxSRIOV)
	}
	seen := make(map[string]bool)
	for _, r := range s.SRIOV {
		if msgs := validation.IsDNS1123Label(r.Pool); len(msgs) > 0 {
			bad("spec.sriov pool %q: %s", r.Pool, strings.Join(msgs, "; "))
		}
		if seen[r.Pool] {
			bad("spec.sriov names pool %q twice", r.Pool)
		}
		seen[r.Pool] = true
		if r.Count < 1 || r.Count > MaxVFs {
			bad("spec.sriov pool %q: count %d is not between 1 and %d", r.Pool, r.Count, MaxVFs)
		}
	}
	p.sriov = slices.Clone(s.SRIOV)
	slices.SortFunc(p.sriov, func(a, b SRIOV) int { return strings.Compare(a.Pool, b.Pool) })
	if s.NodeName != "" && len(s.NodeSelector) > 0 {
		bad("spec.nodeName and spec.nodeSelector are both set")
	}
	if len(s.UserData) > MaxUserData {
		bad("spec.userData is %d bytes, at most %d", len(s.UserData), MaxUserData)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("invalid VirtualMachine %s/%s: %w", v.Namespace, v.Name, errors.Join(errs...))
	}
	return p, nil
}

// memoryOverhead is QEMU's memory beside guest RAM (see DefaultBaseOverhead).
func memoryOverhead(base int64, vcpus int32, guest int64) int64 {
	o := base + int64(vcpus)*perVCPUOverhead + guest/512
	return (o + mib - 1) / mib * mib
}

// buildPod returns the pod v should have, its spec hash in an annotation.
// baseOverhead is Config.BaseOverhead.
func buildPod(v *VirtualMachine, baseOverhead int64) (*corev1.Pod, error) {
	p, err := parse(v)
	if err != nil {
		return nil, err
	}
	s := &v.Spec
	guest := p.memory.Value()
	mem := memoryOverhead(baseOverhead, s.VCPUs, guest)
	res := corev1.ResourceList{corev1.ResourceCPU: *resource.NewQuantity(int64(s.VCPUs), resource.DecimalSI)}
	if p.pageSize.IsZero() {
		mem += guest
	} else {
		res[corev1.ResourceName(corev1.ResourceHugePagesPrefix+s.HugepageSize)] = *resource.NewQuantity(guest, resource.BinarySI)
	}
	res[corev1.ResourceMemory] = *resource.NewQuantity(mem, resource.BinarySI)
	pools := make([]string, 0, len(p.sriov))
	for _, r := range p.sriov {
		res[corev1.ResourceName(SRIOVResourcePrefix+r.Pool)] = *resource.NewQuantity(int64(r.Count), resource.DecimalSI)
		pools = append(pools, r.Pool+"="+strconv.Itoa(int(r.Count)))
	}
	disk := ""
	if p.disk != nil {
		disk = p.disk.String()
	}
	ann := map[string]string{
		AnnotationName:          v.Name,
		AnnotationVCPUs:         strconv.Itoa(int(s.VCPUs)),
		AnnotationMemory:        p.memory.String(),
		AnnotationHugepageSize:  s.HugepageSize,
		AnnotationDedicatedCPUs: strconv.FormatBool(s.DedicatedCPUs),
		AnnotationSRIOV:         strings.Join(pools, ","),
		AnnotationDiskSize:      disk,
	}
	if s.UserData != "" {
		ann[AnnotationUserData] = s.UserData
	}
	runtimeClass := RuntimeClassName
	pod := &corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			Name:            PodName(v.Name),
			Namespace:       v.Namespace,
			Labels:          map[string]string{LabelName: v.Name},
			Annotations:     ann,
			OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(v, GVR.GroupVersion().WithKind(Kind))},
		},
		Spec: corev1.PodSpec{
			RuntimeClassName: &runtimeClass,
			NodeName:         s.NodeName,
			NodeSelector:     s.NodeSelector,
			RestartPolicy:    corev1.RestartPolicyAlways,
			// A VM has no use for an API token or service environment
			// variables, and the edge should not mount one for it.
			AutomountServiceAccountToken: new(false),
			EnableServiceLinks:           new(false),
			Containers: []corev1.Container{{
				Name:            ContainerName,
				Image:           s.Image,
				ImagePullPolicy: corev1.PullNever,
				Resources:       corev1.ResourceRequirements{Requests: res, Limits: res.DeepCopy()},
			}},
		},
	}
	h, err := specHash(pod)
	if err != nil {
		return nil, err
	}
	pod.Annotations[AnnotationSpecHash] = h
	return pod, nil
}

// specHash digests what the controller sets in a pod, but the hash itself.
func specHash(pod *corev1.Pod) (string, error) {
	b, err := json.Marshal(struct {
		Labels, Annotations map[string]string
		Spec                corev1.PodSpec
	}{pod.Labels, pod.Annotations, pod.Spec})
	if err != nil {
		return "", fmt.Errorf("hash pod %s: %w", pod.Name, err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8]), nil
}

// controllerOf returns the VirtualMachine that controls pod, if one does.
func controllerOf(pod *corev1.Pod) *metav1.OwnerReference {
	ref := metav1.GetControllerOf(pod)
	if ref == nil || ref.Kind != Kind || ref.APIVersion != APIVersion {
		return nil
	}
	return ref
}
