// Package vm is CloudCore's VirtualMachine controller: the VirtualMachine
// custom resource (edge.tether.dev/v1alpha1, namespaced; its CRD is
// build/crds/virtualmachine.yaml), its Go types, a small client over the
// dynamic client, and a level-triggered controller that turns each
// VirtualMachine into one Pod it owns (runtimeClassName tether-vm, the
// annotations the edge's VM runtime reads) and mirrors that pod's status
// back into the VirtualMachine's. It runs once per cluster, behind a
// leader election Lease. It never talks to edges: the pod reaches the
// edge, and its status comes back, through the ordinary pod sync.
package vm

import (
	"context"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// GVR is the resource of VirtualMachines.
var GVR = schema.GroupVersionResource{Group: "edge.tether.dev", Version: "v1alpha1", Resource: "virtualmachines"}

// APIVersion and Kind of VirtualMachines.
const (
	APIVersion = "edge.tether.dev/v1alpha1"
	Kind       = "VirtualMachine"
)

// VirtualMachine is one VM.
type VirtualMachine struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              Spec   `json:"spec"`
	Status            Status `json:"status,omitempty"`
}

// Spec is what the user asks for. The CRD's schema checks it; the
// controller checks it again (Validate) since a schema can be older than
// the controller.
type Spec struct {
	// Image is the base image's name in the edge's VM image store.
	Image string `json:"image"`
	// VCPUs is the number of virtual CPUs (1 to MaxVCPUs).
	VCPUs int32 `json:"vcpus"`
	// Memory is guest RAM, a resource.Quantity ("512Mi").
	Memory string `json:"memory"`
	// HugepageSize is "", "2Mi" or "1Gi": the page size backing guest RAM.
	HugepageSize string `json:"hugepageSize,omitempty"`
	// DedicatedCPUs pins each vCPU thread to a core of its own.
	DedicatedCPUs bool `json:"dedicatedCpus,omitempty"`
	// SRIOV lists the VFs to pass through, per pool.
	SRIOV []SRIOV `json:"sriov,omitempty"`
	// DiskSize is the overlay's virtual size; empty: the base image's.
	DiskSize string `json:"diskSize,omitempty"`
	// Running says whether the VM should run. Nil (an object written
	// around the CRD's default) means true.
	Running *bool `json:"running,omitempty"`
	// NodeName binds the VM to one node; NodeSelector lets a scheduler
	// choose. At most one of them.
	NodeName     string            `json:"nodeName,omitempty"`
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`
	// UserData is cloud-init user data, at most MaxUserData bytes.
	UserData string `json:"userData,omitempty"`
}

// SRIOV asks for Count VFs of the node's pool Pool.
type SRIOV struct {
	Pool  string `json:"pool"`
	Count int32  `json:"count"`
}

// Status is what the controller observed, from the VM's pod.
type Status struct {
	// Phase is one of the Phase constants.
	Phase Phase `json:"phase,omitempty"`
	// Reason and Message say why, for phases other than Running.
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message,omitempty"`
	// PodName is the VM's pod, while it exists.
	PodName string `json:"podName,omitempty"`
	// NodeName is the node the pod is bound to.
	NodeName string `json:"nodeName,omitempty"`
	// BootTime is when the edge saw the guest's boot marker.
	BootTime *metav1.Time `json:"bootTime,omitempty"`
	// Acceleration is "kvm" or "tcg", from the edge.
	Acceleration string `json:"acceleration,omitempty"`
	// Console is the tail of the serial console (MaxConsoleLines lines,
	// MaxConsoleBytes bytes at most).
	Console string `json:"console,omitempty"`
	// ObservedGeneration is the spec generation this status was made for.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions are the Condition* types.
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Phase is the VM's coarse state.
type Phase string

// The phases. Stopping is not in issue 9's list: it is a VM with
// running:false whose pod is still being deleted, which is neither Running
// nor Stopped.
const (
	PhasePending   Phase = "Pending"   // no pod yet, or not bound to a node
	PhaseScheduled Phase = "Scheduled" // bound; the compute container is not running
	PhaseBooting   Phase = "Booting"   // the container runs; the boot marker was not seen since it started
	PhaseRunning   Phase = "Running"   // the guest booted
	PhaseStopping  Phase = "Stopping"  // running:false, or the pod is being deleted; it still exists
	PhaseStopped   Phase = "Stopped"   // running:false and no pod, or the pod completed
	PhaseFailed    Phase = "Failed"    // the pod failed (e.g. OutOfcpu), or the spec is invalid
)

// IsRunning reports spec.running, true when unset.
func (s *Spec) IsRunning() bool { return s.Running == nil || *s.Running }

// FromUnstructured converts a dynamic object.
func FromUnstructured(u *unstructured.Unstructured) (*VirtualMachine, error) {
	var v VirtualMachine
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &v); err != nil {
		return nil, fmt.Errorf("decode VirtualMachine %s/%s: %w", u.GetNamespace(), u.GetName(), err)
	}
	return &v, nil
}

// ToUnstructured converts for the dynamic client.
func ToUnstructured(v *VirtualMachine) (*unstructured.Unstructured, error) {
	v.APIVersion, v.Kind = APIVersion, Kind
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(v)
	if err != nil {
		return nil, fmt.Errorf("encode VirtualMachine %s/%s: %w", v.Namespace, v.Name, err)
	}
	return &unstructured.Unstructured{Object: obj}, nil
}

// Client reads and writes VirtualMachines.
type Client struct {
	res dynamic.NamespaceableResourceInterface
}

// NewClient wraps a dynamic client.
func NewClient(d dynamic.Interface) *Client { return &Client{res: d.Resource(GVR)} }

// Get reads one VirtualMachine.
func (c *Client) Get(ctx context.Context, namespace, name string) (*VirtualMachine, error) {
	u, err := c.res.Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return FromUnstructured(u)
}

// Create creates a VirtualMachine in v.Namespace.
func (c *Client) Create(ctx context.Context, v *VirtualMachine) (*VirtualMachine, error) {
	return c.write(ctx, v, func(res dynamic.ResourceInterface, u *unstructured.Unstructured) (*unstructured.Unstructured, error) {
		return res.Create(ctx, u, metav1.CreateOptions{})
	})
}

// Update writes the spec; a stale v fails with a conflict.
func (c *Client) Update(ctx context.Context, v *VirtualMachine) (*VirtualMachine, error) {
	return c.write(ctx, v, func(res dynamic.ResourceInterface, u *unstructured.Unstructured) (*unstructured.Unstructured, error) {
		return res.Update(ctx, u, metav1.UpdateOptions{})
	})
}

// UpdateStatus writes the status; a stale v fails with a conflict.
func (c *Client) UpdateStatus(ctx context.Context, v *VirtualMachine) (*VirtualMachine, error) {
	return c.write(ctx, v, func(res dynamic.ResourceInterface, u *unstructured.Unstructured) (*unstructured.Unstructured, error) {
		return res.UpdateStatus(ctx, u, metav1.UpdateOptions{})
	})
}

func (c *Client) write(ctx context.Context, v *VirtualMachine, op func(dynamic.ResourceInterface, *unstructured.Unstructured) (*unstructured.Unstructured, error)) (*VirtualMachine, error) {
	u, err := ToUnstructured(v)
	if err != nil {
		return nil, err
	}
	out, err := op(c.res.Namespace(v.Namespace), u)
	if err != nil {
		return nil, err
	}
	return FromUnstructured(out)
}

// Delete removes a VirtualMachine.
func (c *Client) Delete(ctx context.Context, namespace, name string) error {
	return c.res.Namespace(namespace).Delete(ctx, name, metav1.DeleteOptions{})
}

// Resource returns the dynamic resource client, for informers.
func (c *Client) Resource() dynamic.NamespaceableResourceInterface { return c.res }
