package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

const tick = 50 * time.Millisecond

// getPod returns the VM's pod, nil when there is none.
func (c *clients) getPod(t *testing.T, vmName string) *corev1.Pod {
	t.Helper()
	p, err := c.kube.CoreV1().Pods(c.ns).Get(context.Background(), PodName(vmName), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	require.NoError(t, err)
	return p
}

// waitPod waits for the VM's pod to exist with a UID other than not.
func (c *clients) waitPod(t *testing.T, vmName string, not types.UID) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	require.Eventually(t, func() bool {
		pod = c.getPod(t, vmName)
		return pod != nil && pod.UID != not
	}, waitFor, tick, "pod of %s", vmName)
	return pod
}

// waitVM waits until the VM's status satisfies ok and returns it.
func (c *clients) waitVM(t *testing.T, name string, ok func(*VirtualMachine) bool) *VirtualMachine {
	t.Helper()
	var last atomic.Pointer[VirtualMachine]
	if !assert.Eventually(t, func() bool {
		v, err := c.vms.Get(context.Background(), c.ns, name)
		if err != nil {
			return false
		}
		last.Store(v)
		return ok(v)
	}, waitFor, tick) {
		if v := last.Load(); v != nil {
			t.Fatalf("virtual machine %s: last status %+v", name, v.Status)
		}
		t.Fatalf("virtual machine %s: never read", name)
	}
	return last.Load()
}

func inPhase(p Phase) func(*VirtualMachine) bool {
	return func(v *VirtualMachine) bool { return v.Status.Phase == p }
}

// edgeWrites writes the pod's status as the edge's pods manager does.
func (c *clients) edgeWrites(t *testing.T, vmName string, edit func(*corev1.PodStatus)) {
	t.Helper()
	require.Eventually(t, func() bool {
		pod := c.getPod(t, vmName)
		edit(&pod.Status)
		_, err := c.kube.CoreV1().Pods(c.ns).UpdateStatus(context.Background(), pod, metav1.UpdateOptions{})
		return err == nil
	}, waitFor, tick)
}

// edgeDeletes finishes a graceful pod deletion, as the edge does once its
// containers stopped.
func (c *clients) edgeDeletes(t *testing.T, pod *corev1.Pod) {
	t.Helper()
	err := c.kube.CoreV1().Pods(c.ns).Delete(context.Background(), pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: new(int64(0)), Preconditions: &metav1.Preconditions{UID: &pod.UID},
	})
	if !apierrors.IsNotFound(err) {
		require.NoError(t, err)
	}
}

func runningCompute(started time.Time) []corev1.ContainerStatus {
	return []corev1.ContainerStatus{{
		Name: ContainerName, Image: "tether-guest", Ready: true, Started: new(true),
		State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(started)}},
	}}
}

// TestVMLifecycle: a VirtualMachine becomes its pod, with the contract's
// fields, on the real API server; the pod's status, written as the edge
// writes it, moves the VM through Scheduled, Booting and Running with its
// boot time, acceleration and console; a resync then writes nothing.
func TestVMLifecycle(t *testing.T) {
	c := newClients(t)
	installRuntimeClass(t, c)
	r := start(t, c, Config{Resync: time.Second})

	v := validVM(c.ns, "web")
	v.Spec.VCPUs, v.Spec.Memory, v.Spec.HugepageSize, v.Spec.DedicatedCPUs = 2, "256Mi", "2Mi", true
	v.Spec.SRIOV, v.Spec.DiskSize = []SRIOV{{Pool: "pool-a", Count: 1}}, "2Gi"
	v, err := c.vms.Create(t.Context(), v)
	require.NoError(t, err)

	pod := c.waitPod(t, "web", "")
	require.Equal(t, map[string]string{
		AnnotationName: "web", AnnotationVCPUs: "2", AnnotationMemory: "256Mi", AnnotationHugepageSize: "2Mi",
		AnnotationDedicatedCPUs: "true", AnnotationSRIOV: "pool-a=1", AnnotationDiskSize: "2Gi",
		AnnotationSpecHash: pod.Annotations[AnnotationSpecHash],
	}, pod.Annotations)
	require.Len(t, pod.Annotations[AnnotationSpecHash], 16)
	ref := metav1.GetControllerOf(pod)
	require.NotNil(t, ref)
	require.Equal(t, v.UID, ref.UID)
	require.Equal(t, "tether-vm", *pod.Spec.RuntimeClassName)
	require.Equal(t, "edge-1", pod.Spec.NodeName)
	require.Equal(t, map[string]string{"node-role.tether.dev/edge": ""}, pod.Spec.NodeSelector, "the RuntimeClass's scheduling is merged in by admission")
	require.Equal(t, corev1.RestartPolicyAlways, pod.Spec.RestartPolicy)
	ctr := pod.Spec.Containers[0]
	require.Equal(t, "compute", ctr.Name)
	require.Equal(t, "tether-guest", ctr.Image)
	require.Equal(t, corev1.PullNever, ctr.ImagePullPolicy)
	// 64Mi + 2×8Mi + 256Mi/512 = 80.5Mi, rounded up to 81Mi.
	want := corev1.ResourceList{"cpu": mustQ("2"), "memory": mustQ("81Mi"), "hugepages-2Mi": mustQ("256Mi"), "sriov.edge.tether.dev/pool-a": mustQ("1")}
	requireResources(t, want, ctr.Resources.Requests)
	requireResources(t, want, ctr.Resources.Limits)
	require.Equal(t, corev1.PodQOSGuaranteed, pod.Status.QOSClass, "requests = limits: the API server rates it Guaranteed")

	v = c.waitVM(t, "web", inPhase(PhaseScheduled))
	require.Equal(t, "edge-1", v.Status.NodeName)
	require.Equal(t, "vm-web", v.Status.PodName)
	require.Equal(t, v.Generation, v.Status.ObservedGeneration)
	requireCondition(t, v, ConditionSynced, metav1.ConditionTrue, ReasonPodInSync)

	started := time.Now().Add(-2 * time.Second).Truncate(time.Second)
	c.edgeWrites(t, "web", func(s *corev1.PodStatus) {
		s.Phase = corev1.PodRunning
		s.ContainerStatuses = runningCompute(started)
	})
	c.waitVM(t, "web", inPhase(PhaseBooting))

	bootedAt := started.Add(time.Second)
	console := "SeaBIOS\nLinux version 6.1\nTETHER-GUEST-BOOTED\n"
	c.edgeWrites(t, "web", func(s *corev1.PodStatus) {
		s.Conditions = append(s.Conditions,
			corev1.PodCondition{Type: PodConditionGuestBooted, Status: corev1.ConditionTrue, Reason: ReasonBootMarkerSeen, Message: "acceleration=tcg", LastTransitionTime: metav1.NewTime(bootedAt)},
			corev1.PodCondition{Type: PodConditionConsole, Status: corev1.ConditionTrue, Message: console, LastTransitionTime: metav1.NewTime(bootedAt)},
		)
	})
	v = c.waitVM(t, "web", inPhase(PhaseRunning))
	require.NotNil(t, v.Status.BootTime)
	require.True(t, bootedAt.Equal(v.Status.BootTime.Time))
	require.Equal(t, "tcg", v.Status.Acceleration)
	require.Equal(t, console, v.Status.Console)
	requireCondition(t, v, ConditionReady, metav1.ConditionTrue, ReasonBootMarkerSeen)
	requireCondition(t, v, ConditionGuestBooted, metav1.ConditionTrue, ReasonBootMarkerSeen)
	requireCondition(t, v, ConditionRestartRequired, metav1.ConditionFalse, ReasonPodInSync)

	// No hot loop: resyncs of an unchanged VM write nothing.
	// A write of the status already seen may still be in flight: counted
	// from after one more sync.
	syncs := r.counter(t, "tether_vm_syncs_total", map[string]string{"result": "ok"})
	require.Eventually(t, func() bool {
		return r.counter(t, "tether_vm_syncs_total", map[string]string{"result": "ok"}) >= syncs+1
	}, waitFor, tick, "one resync")
	writes := r.counter(t, "tether_vm_status_writes_total", nil)
	syncs = r.counter(t, "tether_vm_syncs_total", map[string]string{"result": "ok"})
	require.Eventually(t, func() bool {
		return r.counter(t, "tether_vm_syncs_total", map[string]string{"result": "ok"}) >= syncs+3
	}, waitFor, tick, "three resyncs")
	require.Equal(t, writes, r.counter(t, "tether_vm_status_writes_total", nil), "a resync of an unchanged VM writes no status")
	require.Equal(t, 1.0, r.counter(t, "tether_vm_pod_writes_total", map[string]string{"op": "create"}))
	require.Zero(t, r.counter(t, "tether_vm_syncs_total", map[string]string{"result": "error"}))

	// What `kubectl get vm -o wide` prints: the server's Table.
	raw, err := c.kube.Discovery().RESTClient().Get().AbsPath("/apis", GVR.Group, GVR.Version, "namespaces", c.ns, GVR.Resource).
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").Do(t.Context()).Raw()
	require.NoError(t, err)
	var table metav1.Table
	require.NoError(t, json.Unmarshal(raw, &table))
	var cols []string
	for _, col := range table.ColumnDefinitions {
		cols = append(cols, fmt.Sprintf("%s/%d", col.Name, col.Priority))
	}
	require.Equal(t, []string{"Name/0", "Phase/0", "Node/0", "vCPUs/0", "Memory/0", "Age/0", "Reason/1", "Acceleration/1", "Booted/1", "Image/1"}, cols)
	require.Len(t, table.Rows, 1)
	cells := table.Rows[0].Cells
	require.Equal(t, []any{"web", "Running", "edge-1", float64(2), "256Mi"}, cells[:5])
	require.Equal(t, []any{nil, "tcg"}, cells[6:8], "no reason while Running")
	require.Equal(t, "tether-guest", cells[9])
}

func mustQ(s string) resource.Quantity { return resource.MustParse(s) }

func requireCondition(t *testing.T, v *VirtualMachine, typ string, status metav1.ConditionStatus, reason string) {
	t.Helper()
	cond := meta.FindStatusCondition(v.Status.Conditions, typ)
	require.NotNil(t, cond, "condition %s", typ)
	require.Equal(t, status, cond.Status, "condition %s: %+v", typ, cond)
	require.Equal(t, reason, cond.Reason, "condition %s: %+v", typ, cond)
}

// setRunning writes spec.running.
func (c *clients) setRunning(t *testing.T, name string, run bool) {
	t.Helper()
	c.editSpec(t, name, func(s *Spec) { s.Running = new(run) })
}

func (c *clients) editSpec(t *testing.T, name string, edit func(*Spec)) {
	t.Helper()
	require.Eventually(t, func() bool {
		v, err := c.vms.Get(context.Background(), c.ns, name)
		require.NoError(t, err)
		edit(&v.Spec)
		_, err = c.vms.Update(context.Background(), v)
		return err == nil
	}, waitFor, tick)
}

// TestRunningFalseTrue: running:false deletes the pod and keeps the VM
// (Stopping while the edge stops it, then Stopped); running:true makes a
// new pod.
func TestRunningFalseTrue(t *testing.T) {
	c := newClients(t)
	installRuntimeClass(t, c)
	start(t, c, Config{})
	_, err := c.vms.Create(t.Context(), validVM(c.ns, "db"))
	require.NoError(t, err)
	first := c.waitPod(t, "db", "")
	c.edgeWrites(t, "db", func(s *corev1.PodStatus) {
		s.Phase = corev1.PodRunning
		s.ContainerStatuses = runningCompute(time.Now().Truncate(time.Second))
	})
	c.waitVM(t, "db", inPhase(PhaseBooting))

	c.setRunning(t, "db", false)
	// A bound pod's deletion is graceful: it waits for the edge.
	c.waitVM(t, "db", inPhase(PhaseStopping))
	require.NotNil(t, c.getPod(t, "db").DeletionTimestamp)
	c.edgeDeletes(t, first)
	v := c.waitVM(t, "db", inPhase(PhaseStopped))
	require.Equal(t, ReasonStopped, v.Status.Reason)
	require.Empty(t, v.Status.PodName)
	require.Nil(t, c.getPod(t, "db"))

	c.setRunning(t, "db", true)
	second := c.waitPod(t, "db", first.UID)
	require.NotEqual(t, first.UID, second.UID)
	c.waitVM(t, "db", inPhase(PhaseScheduled))
}

// TestFailedPod: a pod the edge refused (OutOfcpu) makes the VM Failed
// with the pod's reason; a spec change then replaces the failed pod at
// once, where a running pod only gets RestartRequired.
func TestFailedPod(t *testing.T) {
	c := newClients(t)
	installRuntimeClass(t, c)
	start(t, c, Config{})
	v := validVM(c.ns, "big")
	v.Spec.VCPUs = 64
	_, err := c.vms.Create(t.Context(), v)
	require.NoError(t, err)
	first := c.waitPod(t, "big", "")
	c.edgeWrites(t, "big", func(s *corev1.PodStatus) {
		s.Phase, s.Reason, s.Message = corev1.PodFailed, "OutOfcpu", "Pod was rejected: Node didn't have enough resource: cpu, requested: 64000, used: 0, capacity: 4000"
	})
	v = c.waitVM(t, "big", inPhase(PhaseFailed))
	require.Equal(t, "OutOfcpu", v.Status.Reason)
	require.Contains(t, v.Status.Message, "enough resource: cpu")
	requireCondition(t, v, ConditionReady, metav1.ConditionFalse, "OutOfcpu")
	require.Equal(t, first.UID, c.getPod(t, "big").UID, "a failed pod with an unchanged spec stays, for its reason")

	c.editSpec(t, "big", func(s *Spec) { s.VCPUs = 2 })
	second := c.waitPod(t, "big", first.UID)
	require.Equal(t, "2", second.Annotations[AnnotationVCPUs])
	c.waitVM(t, "big", func(v *VirtualMachine) bool {
		return v.Status.Phase == PhaseScheduled && v.Status.ObservedGeneration == v.Generation
	})

	// The same change on a live pod: RestartRequired, the pod kept.
	c.edgeWrites(t, "big", func(s *corev1.PodStatus) {
		s.Phase = corev1.PodRunning
		s.ContainerStatuses = runningCompute(time.Now().Truncate(time.Second))
	})
	c.waitVM(t, "big", inPhase(PhaseBooting))
	c.editSpec(t, "big", func(s *Spec) { s.Memory = "1Gi" })
	v = c.waitVM(t, "big", func(v *VirtualMachine) bool {
		cond := meta.FindStatusCondition(v.Status.Conditions, ConditionRestartRequired)
		return cond != nil && cond.Status == metav1.ConditionTrue
	})
	requireCondition(t, v, ConditionRestartRequired, metav1.ConditionTrue, ReasonSpecChanged)
	require.Equal(t, PhaseBooting, v.Status.Phase)
	require.Equal(t, second.UID, c.getPod(t, "big").UID)
}

// TestDeleteVM: deleting the VirtualMachine deletes its pod, without the
// garbage collector (this control plane runs none); a VM made again under
// the same name gets a pod of its own once the old one is gone.
func TestDeleteVM(t *testing.T) {
	c := newClients(t)
	installRuntimeClass(t, c)
	r := start(t, c, Config{})
	_, err := c.vms.Create(t.Context(), validVM(c.ns, "gone"))
	require.NoError(t, err)
	pod := c.waitPod(t, "gone", "")
	require.NoError(t, c.vms.Delete(t.Context(), c.ns, "gone"))
	require.Eventually(t, func() bool {
		p := c.getPod(t, "gone")
		return p == nil || p.DeletionTimestamp != nil
	}, waitFor, tick)
	require.Equal(t, 1.0, r.counter(t, "tether_vm_pod_writes_total", map[string]string{"op": "delete"}))

	// A new VM of the same name while the old pod is still stopping: it
	// waits for that pod to go, then gets its own.
	nv, err := c.vms.Create(t.Context(), validVM(c.ns, "gone"))
	require.NoError(t, err)
	v := c.waitVM(t, "gone", inPhase(PhasePending))
	require.Equal(t, ReasonNoPod, v.Status.Reason)
	require.Equal(t, pod.UID, c.getPod(t, "gone").UID, "the old pod is not replaced while it stops")
	c.edgeDeletes(t, pod)
	own := c.waitPod(t, "gone", pod.UID)
	require.Equal(t, nv.UID, controllerOf(own).UID)
	c.waitVM(t, "gone", inPhase(PhaseScheduled))
}

// TestPodConflict: a pod the VM does not control that holds its pod's
// name is never touched; the VM says why it is Pending and the conflict
// is counted; once that pod goes, the VM's own pod is made. Pods with the
// label but no VM controller are ignored.
func TestPodConflict(t *testing.T) {
	c := newClients(t)
	installRuntimeClass(t, c)
	r := start(t, c, Config{})
	foreign := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: PodName("taken"), Namespace: c.ns, Labels: map[string]string{LabelName: "taken"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "busybox"}}},
	}
	foreign, err := c.kube.CoreV1().Pods(c.ns).Create(t.Context(), foreign, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = c.vms.Create(t.Context(), validVM(c.ns, "taken"))
	require.NoError(t, err)
	v := c.waitVM(t, "taken", func(v *VirtualMachine) bool { return v.Status.Reason == ReasonPodConflict })
	require.Equal(t, PhasePending, v.Status.Phase)
	requireCondition(t, v, ConditionSynced, metav1.ConditionFalse, ReasonPodConflict)
	require.Positive(t, r.counter(t, "tether_vm_bad_input_total", map[string]string{"cause": "pod_conflict"}))
	got := c.getPod(t, "taken")
	require.Equal(t, foreign.UID, got.UID)
	require.Nil(t, got.DeletionTimestamp, "a pod the VM does not control is never deleted")
	require.Nil(t, metav1.GetControllerOf(got))

	require.NoError(t, c.kube.CoreV1().Pods(c.ns).Delete(t.Context(), foreign.Name, metav1.DeleteOptions{}))
	own := c.waitPod(t, "taken", foreign.UID)
	require.NotNil(t, controllerOf(own))
	c.waitVM(t, "taken", inPhase(PhaseScheduled))
}

// TestPodWriteFailed: a pod the API server refuses (here an admission
// policy that refuses every pod of the namespace) leaves the VM Pending
// with the server's reason in Synced, counted as a failed sync and retried
// with back-off; once the refusal goes, the pod is made.
func TestPodWriteFailed(t *testing.T) {
	c := newClients(t)
	installRuntimeClass(t, c)
	adm := c.kube.AdmissionregistrationV1()
	name := "refuse-pods-" + c.ns
	_, err := adm.ValidatingAdmissionPolicies().Create(t.Context(), &admissionv1.ValidatingAdmissionPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: admissionv1.ValidatingAdmissionPolicySpec{
			FailurePolicy: new(admissionv1.Fail),
			MatchConstraints: &admissionv1.MatchResources{ResourceRules: []admissionv1.NamedRuleWithOperations{{
				RuleWithOperations: admissionv1.RuleWithOperations{
					Operations: []admissionv1.OperationType{admissionv1.Create},
					Rule:       admissionv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}},
				},
			}}},
			Validations: []admissionv1.Validation{{Expression: "false", Message: "the test refuses pods here"}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = adm.ValidatingAdmissionPolicies().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	_, err = adm.ValidatingAdmissionPolicyBindings().Create(t.Context(), &admissionv1.ValidatingAdmissionPolicyBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: admissionv1.ValidatingAdmissionPolicyBindingSpec{
			PolicyName:        name,
			ValidationActions: []admissionv1.ValidationAction{admissionv1.Deny},
			MatchResources: &admissionv1.MatchResources{NamespaceSelector: &metav1.LabelSelector{
				MatchLabels: map[string]string{"kubernetes.io/metadata.name": c.ns},
			}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	deleteBinding := func() {
		_ = adm.ValidatingAdmissionPolicyBindings().Delete(context.Background(), name, metav1.DeleteOptions{})
	}
	t.Cleanup(deleteBinding)
	probe := func() error {
		_, err := c.kube.CoreV1().Pods(c.ns).Create(context.Background(), &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "probe"},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "a", Image: "b"}}},
		}, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err
	}
	require.Eventually(t, func() bool { return probe() != nil }, waitFor, tick, "the policy is in force")

	r := start(t, c, Config{})
	_, err = c.vms.Create(t.Context(), validVM(c.ns, "refused"))
	require.NoError(t, err)
	v := c.waitVM(t, "refused", func(v *VirtualMachine) bool { return v.Status.Reason == ReasonPodWriteFailed })
	require.Equal(t, PhasePending, v.Status.Phase)
	requireCondition(t, v, ConditionSynced, metav1.ConditionFalse, ReasonPodWriteFailed)
	require.Contains(t, meta.FindStatusCondition(v.Status.Conditions, ConditionSynced).Message, "the test refuses pods here")
	require.Nil(t, c.getPod(t, "refused"))
	// The sync counts its result after it has written the status.
	require.Eventually(t, func() bool {
		return r.counter(t, "tether_vm_syncs_total", map[string]string{"result": "error"}) > 0
	}, waitFor, tick, "the failed sync is counted")

	deleteBinding()
	c.waitPod(t, "refused", "")
	v = c.waitVM(t, "refused", inPhase(PhaseScheduled))
	requireCondition(t, v, ConditionSynced, metav1.ConditionTrue, ReasonPodInSync)
}
