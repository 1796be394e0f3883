package pods_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/pods"
)

// vmPod is a pod as the VirtualMachine controller makes it (BRIEF-VM's
// contract): runtime class tether-vm, the VM annotations, one container
// "compute" whose image is the VM's base image, requests = limits.
func vmPod(name, cpu, memory, hugepages string) *corev1.Pod {
	class := "tether-vm"
	res := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse(memory)}
	if hugepages != "" {
		res["hugepages-2Mi"] = resource.MustParse(hugepages)
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name), Annotations: map[string]string{
			"vm.edge.tether.dev/name": name, "vm.edge.tether.dev/vcpus": cpu, "vm.edge.tether.dev/memory": memory,
			"vm.edge.tether.dev/hugepage-size": "2Mi", "vm.edge.tether.dev/dedicated-cpus": "false",
		}},
		Spec: corev1.PodSpec{
			NodeName: "edge-1", HostNetwork: true, RuntimeClassName: &class, RestartPolicy: corev1.RestartPolicyAlways,
			Containers: []corev1.Container{{
				Name: "compute", Image: "tether-guest", ImagePullPolicy: corev1.PullNever,
				Resources: corev1.ResourceRequirements{Requests: res, Limits: res},
			}},
		},
	}
}

// Pods and VMs draw on one account: with a VM pod admitted, pods that
// would take the node past its allocatable cpu, memory or hugepages fail
// with the resource named, one that fits runs, and then a second VM that
// does not fit fails the same way and gets no sandbox. (The VM pod's
// runtime class maps to containerd's default handler here, so its sandbox
// runs on containerd: what is checked is the admission, which comes before
// any runtime. edgecore/app's VM tests run VM pods on the VM backend.)
func TestPodsAndVMsShareAllocatable(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{RuntimeHandlers: map[string]string{"tether-vm": ""}, Allocatable: corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse("2"), corev1.ResourceMemory: resource.MustParse("1Gi"),
		"hugepages-2Mi": resource.MustParse("128Mi"), corev1.ResourcePods: resource.MustParse("10"),
	}})
	failed := func(st corev1.PodStatus) bool { return st.Phase == corev1.PodFailed }

	vm := vmPod("vm-a", "1", "512Mi", "128Mi")
	e.put(vm)
	require.Eventually(t, func() bool { return len(sandboxes(t, e, vm.UID)) == 1 }, 30*time.Second, 50*time.Millisecond, "the VM pod is admitted")

	q := func(name corev1.ResourceName, v string) corev1.ResourceList {
		return corev1.ResourceList{name: resource.MustParse(v)}
	}
	for _, tc := range []struct {
		name      string
		res       corev1.ResourceList
		reason    string
		requested string
	}{
		{"web-cpu", q(corev1.ResourceCPU, "1500m"), "OutOfcpu", "cpu, requested: 1500, used: 1000, capacity: 2000"},
		{"web-memory", q(corev1.ResourceMemory, "600Mi"), "OutOfmemory", "memory, requested: 629145600, used: 536870912, capacity: 1073741824"},
		{"web-hugepages", q("hugepages-2Mi", "2Mi"), "OutOfhugepages-2Mi", "hugepages-2Mi, requested: 2097152, used: 134217728, capacity: 134217728"},
	} {
		p := busyboxPod(e.h, tc.name, corev1.RestartPolicyAlways, true, "sleep", "3600")
		p.Spec.Containers[0].Resources = corev1.ResourceRequirements{Requests: tc.res, Limits: tc.res}
		e.put(p)
		st := e.waitStatus(p, "rejected", failed)
		require.Equal(t, tc.reason, st.Reason, tc.name)
		require.Equal(t, "Pod was rejected: Node didn't have enough resource: "+tc.requested, st.Message, tc.name)
		requireNoSandbox(t, e, p)
	}

	fits := busyboxPod(e.h, "web-fits", corev1.RestartPolicyAlways, true, "sleep", "3600")
	fits.Spec.Containers[0].Resources.Requests = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("500m"), corev1.ResourceMemory: resource.MustParse("256Mi")}
	e.put(fits)
	e.waitStatus(fits, "running", running)

	second := vmPod("vm-b", "1", "128Mi", "")
	e.put(second)
	st := e.waitStatus(second, "rejected", failed)
	require.Equal(t, "OutOfcpu", st.Reason)
	require.Equal(t, "Pod was rejected: Node didn't have enough resource: cpu, requested: 1000, used: 1500, capacity: 2000", st.Message)
	requireNoSandbox(t, e, second)
	st, ok := e.pub.status(t, string(vm.UID))
	require.True(t, !ok || st.Phase != corev1.PodFailed, "the admitted VM pod stays admitted: %+v", st)
}

func sandboxes(t *testing.T, e *env, uid types.UID) []*runtimeapi.PodSandbox {
	t.Helper()
	sbs, err := e.h.Runtime.ListPodSandbox(e.ctx, &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(uid)},
	})
	require.NoError(t, err)
	return sbs
}
