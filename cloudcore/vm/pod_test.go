package vm

import (
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// TestBuildPod: the pod of a VM has exactly the contract's fields.
func TestBuildPod(t *testing.T) {
	q := resource.MustParse
	for _, tc := range []struct {
		name string
		spec Spec
		res  corev1.ResourceList
		ann  map[string]string
	}{{
		name: "plain",
		spec: Spec{Image: "tether-guest", VCPUs: 2, Memory: "512Mi", NodeName: "edge-1"},
		// 64Mi + 2×8Mi + 512Mi/512 = 81Mi of overhead.
		res: corev1.ResourceList{"cpu": q("2"), "memory": q("593Mi")},
		ann: map[string]string{
			AnnotationName: "vm1", AnnotationVCPUs: "2", AnnotationMemory: "512Mi", AnnotationHugepageSize: "",
			AnnotationDedicatedCPUs: "false", AnnotationSRIOV: "", AnnotationDiskSize: "",
		},
	}, {
		name: "hugepages, dedicated, sriov, disk, user data",
		spec: Spec{
			Image: "tether-guest", VCPUs: 4, Memory: "1Gi", HugepageSize: "2Mi", DedicatedCPUs: true, DiskSize: "2Gi",
			SRIOV: []SRIOV{{Pool: "pool-b", Count: 2}, {Pool: "pool-a", Count: 1}}, NodeName: "edge-1", UserData: "#cloud-config\n",
		},
		// Guest RAM is in hugepages-2Mi; memory is only the overhead:
		// 64Mi + 4×8Mi + 1Gi/512 = 98Mi.
		res: corev1.ResourceList{"cpu": q("4"), "memory": q("98Mi"), "hugepages-2Mi": q("1Gi"),
			"sriov.edge.tether.dev/pool-a": q("1"), "sriov.edge.tether.dev/pool-b": q("2")},
		ann: map[string]string{
			AnnotationName: "vm1", AnnotationVCPUs: "4", AnnotationMemory: "1Gi", AnnotationHugepageSize: "2Mi",
			AnnotationDedicatedCPUs: "true", AnnotationSRIOV: "pool-a=1,pool-b=2", AnnotationDiskSize: "2Gi",
			AnnotationUserData: "#cloud-config\n",
		},
	}, {
		name: "memory spelt another way is canonical",
		spec: Spec{Image: "tether-guest", VCPUs: 1, Memory: "0.5Gi", HugepageSize: "1Gi", NodeSelector: map[string]string{"site": "a"}},
		res:  nil, // refused below: 512Mi is not whole 1Gi pages
	}} {
		t.Run(tc.name, func(t *testing.T) {
			v := &VirtualMachine{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "vm1", UID: types.UID("uid-1")}, Spec: tc.spec}
			pod, err := buildPod(v, DefaultBaseOverhead)
			if tc.res == nil {
				require.ErrorContains(t, err, "whole number of 1Gi huge pages")
				return
			}
			require.NoError(t, err)
			require.Equal(t, "vm-vm1", pod.Name)
			require.Equal(t, "ns", pod.Namespace)
			require.Equal(t, map[string]string{LabelName: "vm1"}, pod.Labels)
			hash := pod.Annotations[AnnotationSpecHash]
			require.Len(t, hash, 16)
			delete(pod.Annotations, AnnotationSpecHash)
			require.Equal(t, tc.ann, pod.Annotations)
			require.Equal(t, []metav1.OwnerReference{{
				APIVersion: APIVersion, Kind: Kind, Name: "vm1", UID: "uid-1", Controller: new(true), BlockOwnerDeletion: new(true),
			}}, pod.OwnerReferences)
			s := pod.Spec
			require.Equal(t, "tether-vm", *s.RuntimeClassName)
			require.Equal(t, tc.spec.NodeName, s.NodeName)
			require.Equal(t, tc.spec.NodeSelector, s.NodeSelector)
			require.Equal(t, corev1.RestartPolicyAlways, s.RestartPolicy)
			require.False(t, *s.AutomountServiceAccountToken)
			require.Empty(t, s.Tolerations)
			require.Len(t, s.Containers, 1)
			ctr := s.Containers[0]
			require.Equal(t, "compute", ctr.Name)
			require.Equal(t, "tether-guest", ctr.Image)
			require.Equal(t, corev1.PullNever, ctr.ImagePullPolicy)
			requireResources(t, tc.res, ctr.Resources.Requests)
			requireResources(t, tc.res, ctr.Resources.Limits)

			// The hash is deterministic and follows the spec.
			again, err := buildPod(v, DefaultBaseOverhead)
			require.NoError(t, err)
			require.Equal(t, hash, again.Annotations[AnnotationSpecHash])
			v.Spec.VCPUs++
			changed, err := buildPod(v, DefaultBaseOverhead)
			require.NoError(t, err)
			require.NotEqual(t, hash, changed.Annotations[AnnotationSpecHash])
		})
	}
}

func requireResources(t *testing.T, want, got corev1.ResourceList) {
	t.Helper()
	require.Len(t, got, len(want), "resources %v, want %v", got, want)
	for name, q := range want {
		g, ok := got[name]
		require.True(t, ok, "resource %s missing", name)
		require.Zero(t, q.Cmp(g), "%s is %s, want %s", name, g.String(), q.String())
	}
}

// TestValidate: what the controller refuses, with messages naming the
// field, for specs the schema may not have checked.
func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		spec Spec
		want string
	}{
		{Spec{Image: "g", VCPUs: 1, Memory: "64Mi"}, ""},
		{Spec{Image: "g", VCPUs: 1, Memory: "64Mi", SRIOV: []SRIOV{{Pool: "a", Count: 1}, {Pool: "a", Count: 1}}}, `names pool "a" twice`},
		{Spec{Image: "g", VCPUs: 1, Memory: "64Mi", SRIOV: []SRIOV{{Pool: "a", Count: 65}}}, "count 65"},
		{Spec{Image: "g", VCPUs: 1, Memory: "64Mi", HugepageSize: "16Mi"}, "spec.hugepageSize"},
		{Spec{Image: "g", VCPUs: 1, Memory: "64Mi", DiskSize: "-1Gi"}, "spec.diskSize"},
		{Spec{Image: "g", VCPUs: 1, Memory: "64Mi", UserData: string(make([]byte, MaxUserData+1))}, "spec.userData"},
		{Spec{Image: "g", VCPUs: 1, Memory: "64Mi", NodeName: "a", NodeSelector: map[string]string{"a": "b"}}, "both set"},
		{Spec{Image: "g", VCPUs: 0, Memory: "x"}, "spec.vcpus 0"}, // every error is reported
		{Spec{Image: "g", VCPUs: 0, Memory: "x"}, `spec.memory "x"`},
	} {
		err := Validate(&VirtualMachine{ObjectMeta: metav1.ObjectMeta{Name: "v"}, Spec: tc.spec})
		if tc.want == "" {
			require.NoError(t, err)
			continue
		}
		require.ErrorContains(t, err, tc.want)
	}
}
