package vm

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// validVM is a VM the schema and Validate accept.
func validVM(ns, name string) *VirtualMachine {
	return &VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       Spec{Image: "tether-guest", VCPUs: 2, Memory: "512Mi", NodeName: "edge-1"},
	}
}

// TestCRDRefusesInvalid: the real API server refuses, with the schema's
// message, each invalid VirtualMachine, and Validate refuses it too (the
// controller's second line for schemas older than it).
func TestCRDRefusesInvalid(t *testing.T) {
	c := newClients(t)
	for _, tc := range []struct {
		name    string
		mutate  func(v *VirtualMachine)
		raw     func(u map[string]any) // edits the object past the Go types
		apiErr  string
		noLocal bool // a rule only the schema can state (a field's type)
	}{
		{name: "no vcpus", mutate: func(v *VirtualMachine) { v.Spec.VCPUs = 0 }, apiErr: "spec.vcpus"},
		{name: "too many vcpus", mutate: func(v *VirtualMachine) { v.Spec.VCPUs = 129 }, apiErr: "spec.vcpus"},
		{name: "memory not a quantity", mutate: func(v *VirtualMachine) { v.Spec.Memory = "lots" }, apiErr: "memory must be a quantity"},
		{name: "memory too small", mutate: func(v *VirtualMachine) { v.Spec.Memory = "8Mi" }, apiErr: "at least 16Mi"},
		{name: "memory not whole MiB", mutate: func(v *VirtualMachine) { v.Spec.Memory = "100000000" }, apiErr: "whole number of MiB"},
		{name: "memory too large", mutate: func(v *VirtualMachine) { v.Spec.Memory = "2Ti" }, apiErr: "below 1Ti"},
		{name: "bad hugepage size", mutate: func(v *VirtualMachine) { v.Spec.HugepageSize = "4Ki" }, apiErr: "spec.hugepageSize"},
		{name: "memory not whole huge pages", mutate: func(v *VirtualMachine) { v.Spec.HugepageSize = "1Gi"; v.Spec.Memory = "1536Mi" }, apiErr: "whole number of huge pages"},
		{name: "no image", mutate: func(v *VirtualMachine) { v.Spec.Image = "" }, apiErr: "spec.image"},
		{name: "image with a slash", mutate: func(v *VirtualMachine) { v.Spec.Image = "../etc/passwd" }, apiErr: "spec.image"},
		{name: "nodeName and nodeSelector", mutate: func(v *VirtualMachine) { v.Spec.NodeSelector = map[string]string{"site": "a"} }, apiErr: "not both"},
		{name: "sriov count zero", mutate: func(v *VirtualMachine) { v.Spec.SRIOV = []SRIOV{{Pool: "a", Count: 0}} }, apiErr: "spec.sriov[0].count"},
		{name: "sriov bad pool", mutate: func(v *VirtualMachine) { v.Spec.SRIOV = []SRIOV{{Pool: "Pool_A", Count: 1}} }, apiErr: "spec.sriov[0].pool"},
		{name: "sriov pool twice", mutate: func(v *VirtualMachine) { v.Spec.SRIOV = []SRIOV{{Pool: "a", Count: 1}, {Pool: "a", Count: 2}} }, apiErr: "Duplicate value"},
		{name: "disk size zero", mutate: func(v *VirtualMachine) { v.Spec.DiskSize = "0" }, apiErr: "positive quantity"},
		{name: "user data too large", mutate: func(v *VirtualMachine) { v.Spec.UserData = strings.Repeat("é", 40000) }, apiErr: "at most 65536 bytes"},
		{name: "name too long", mutate: func(v *VirtualMachine) { v.Name = strings.Repeat("n", 64) }, apiErr: "at most 63 characters"},
		{name: "vcpus a string", raw: func(u map[string]any) { u["spec"].(map[string]any)["vcpus"] = "two" }, apiErr: "spec.vcpus", noLocal: true},
		{name: "no spec", raw: func(u map[string]any) { delete(u, "spec") }, apiErr: "spec", noLocal: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := validVM(c.ns, "bad")
			if tc.mutate != nil {
				tc.mutate(v)
			}
			if !tc.noLocal {
				require.Error(t, Validate(v), "Validate must refuse what the schema refuses")
			}
			u, err := ToUnstructured(v)
			require.NoError(t, err)
			if tc.raw != nil {
				tc.raw(u.Object)
			}
			_, err = c.dyn.Resource(GVR).Namespace(c.ns).Create(t.Context(), u, metav1.CreateOptions{})
			require.Error(t, err)
			require.True(t, apierrors.IsInvalid(err) || apierrors.IsBadRequest(err), "refused as invalid, got %v", err)
			require.ErrorContains(t, err, tc.apiErr)
		})
	}
}

// TestCRDAcceptsValid: the edges of the valid ranges are accepted, and
// running defaults to true.
func TestCRDAcceptsValid(t *testing.T) {
	c := newClients(t)
	for i, mutate := range []func(v *VirtualMachine){
		func(*VirtualMachine) {},
		func(v *VirtualMachine) { v.Spec.VCPUs, v.Spec.Memory = 128, "16Mi" },
		func(v *VirtualMachine) { v.Spec.HugepageSize, v.Spec.Memory = "2Mi", "1Gi" },
		func(v *VirtualMachine) { v.Spec.HugepageSize, v.Spec.Memory = "1Gi", "2Gi" },
		func(v *VirtualMachine) {
			v.Spec.NodeName, v.Spec.NodeSelector = "", map[string]string{"site": "shop-17"}
			v.Spec.SRIOV = []SRIOV{{Pool: "pool-b", Count: 2}, {Pool: "pool-a", Count: 1}}
			v.Spec.DiskSize, v.Spec.DedicatedCPUs = "2Gi", true
			v.Spec.UserData = strings.Repeat("x", MaxUserData)
		},
		func(v *VirtualMachine) { v.Name = strings.Repeat("n", 63) },
	} {
		v := validVM(c.ns, "ok-"+string(rune('a'+i)))
		mutate(v)
		require.NoError(t, Validate(v))
		got, err := c.vms.Create(t.Context(), v)
		require.NoError(t, err, "case %d", i)
		require.True(t, got.Spec.IsRunning())
		require.NotNil(t, got.Spec.Running, "running defaults to true in the schema")
	}
	// The schema's default is visible through the raw object too.
	u, err := c.dyn.Resource(GVR).Namespace(c.ns).Get(t.Context(), "ok-a", metav1.GetOptions{})
	require.NoError(t, err)
	r, found, err := unstructured.NestedBool(u.Object, "spec", "running")
	require.NoError(t, err)
	require.True(t, found && r)
}
