package app_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/vmguest"
)

// vmPod is the pod the VM controller makes of a VirtualMachine.
func vmPod(name string) *corev1.Pod {
	class := "tether-vm"
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name), Annotations: map[string]string{
			vm.AnnotationName: name, vm.AnnotationVCPUs: "1", vm.AnnotationMemory: "128Mi",
		}},
		Spec: corev1.PodSpec{NodeName: "edge-1", RuntimeClassName: &class, Containers: []corev1.Container{{
			Name: "compute", Image: vmguest.ImageName, ImagePullPolicy: corev1.PullNever,
		}}},
	}
}

// podStatus is the newest status of uid queued in a's outbox.
func podStatus(ctx context.Context, a *app.App, uid string) (corev1.PodStatus, bool) {
	items, err := a.Store().Pending(ctx, 1000)
	if err != nil {
		return corev1.PodStatus{}, false
	}
	var st corev1.PodStatus
	found := false
	for _, it := range items {
		if it.Op == message.OpStatus && it.Resource.Kind == "Pod" && it.Resource.UID == uid {
			found = json.Unmarshal(it.Data, &st) == nil
		}
	}
	return st, found
}

func podCondition(st corev1.PodStatus, t corev1.PodConditionType) *corev1.PodCondition {
	for i := range st.Conditions {
		if st.Conditions[i].Type == t {
			return &st.Conditions[i]
		}
	}
	return nil
}

// A VM pod from the store runs through the whole edge path (store -> pods
// -> CRI -> shim -> VM backend -> QEMU): the pod is Running with the
// GuestBooted condition (heard from the backend's boot event: the relist
// is an hour away) and the console's tail, the Node carries the
// acceleration label, and deleting the pod powers the guest down and
// leaves no allocation.
func TestVMPodThroughInProcessShim(t *testing.T) {
	h := containerd.Start(t)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 6*time.Minute)
	defer cancel()
	cfg := config(t)
	images, err := vm.OpenImages(filepath.Join(cfg.DataDir, "vm-images"), "")
	require.NoError(t, err)
	vmguest.Import(t, images)
	cfg.CRI = app.CRIConfig{
		Listen: filepath.Join(vmguest.RunDir(t), "cri.sock"), Containerd: h.Endpoint(),
		VM: &app.VMConfig{RunDir: vmguest.RunDir(t), Accel: vmguest.Accel(t)},
	}
	cfg.Pods = pods.Config{LogDir: filepath.Join(t.TempDir(), "logs"), RelistPeriod: time.Hour}
	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close()) }()
	pod := vmPod("guest")
	putPod(ctx, t, a, pod)
	stop := run(ctx, t, a)
	defer stop()

	var st corev1.PodStatus
	require.Eventually(t, func() bool {
		var ok bool
		st, ok = podStatus(ctx, a, "uid-guest")
		c := podCondition(st, pods.ConditionGuestBooted)
		return ok && st.Phase == corev1.PodRunning && c != nil && c.Status == corev1.ConditionTrue
	}, 4*time.Minute, 100*time.Millisecond, "Running with GuestBooted")
	booted := podCondition(st, pods.ConditionGuestBooted)
	require.Equal(t, "BootMarkerSeen", booted.Reason)
	require.Equal(t, "acceleration="+vmguest.Accel(t), booted.Message)
	console := podCondition(st, pods.ConditionConsole)
	require.NotNil(t, console)
	require.Contains(t, console.Message, vm.BootMarker)
	require.LessOrEqual(t, len(console.Message), vm.ConsoleBytes)
	require.LessOrEqual(t, strings.Count(console.Message, "\n"), vm.ConsoleLines-1)

	require.Eventually(t, func() bool {
		items, err := a.Store().Pending(ctx, 1000)
		if err != nil {
			return false
		}
		for _, it := range items {
			var n corev1.Node
			if it.Resource.Kind == "Node" && json.Unmarshal(it.Data, &n) == nil && n.Labels[app.LabelAcceleration] == vmguest.Accel(t) {
				return true
			}
		}
		return false
	}, time.Minute, 100*time.Millisecond, "the Node's acceleration label")

	rows, err := a.Store().Allocations().Kind(ctx, vm.KindVM)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	require.NoError(t, a.Store().Apply(ctx, []store.Change{{Op: message.OpDelete, Object: store.Object{
		Resource: message.Resource{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name},
	}}}))
	require.Eventually(t, func() bool {
		all, err := a.Store().Allocations().Kind(ctx, "")
		return err == nil && len(all) == 0
	}, 2*time.Minute, 100*time.Millisecond, "the VM's record goes with the pod")
	logs, err := filepath.Glob(filepath.Join(cfg.Pods.LogDir, "*", "compute_0.log"))
	require.NoError(t, err)
	require.Len(t, logs, 1)
	require.Equal(t, 1, vmguest.CountMarker(logs[0], "TETHER-GUEST-POWERDOWN"), "the guest was powered down, not killed")
}
