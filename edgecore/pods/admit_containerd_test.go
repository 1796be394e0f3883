package pods_test

import (
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/pods"
)

// On a node with one CPU, of two pods requesting 600m each the first runs
// and the second is Failed with OutOfcpu and never gets a sandbox; a new
// manager (EdgeCore restarted) keeps the first admitted from its sandbox
// and still refuses the second.
func TestAdmissionRejectsWhatDoesNotFit(t *testing.T) {
	e := newEnv(t)
	cfg := pods.Config{Allocatable: corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourcePods: resource.MustParse("10"),
	}}
	stop := e.run(cfg)
	req := func(p *corev1.Pod) *corev1.Pod {
		p.Spec.Containers[0].Resources.Requests = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("600m")}
		return p
	}
	first := req(busyboxPod(e.h, "first", corev1.RestartPolicyAlways, true, "sleep", "3600"))
	second := req(busyboxPod(e.h, "second", corev1.RestartPolicyAlways, true, "sleep", "3600"))
	e.put(first)
	e.waitStatus(first, "running", running)
	e.put(second)
	rejected := func(st corev1.PodStatus) bool { return st.Phase == corev1.PodFailed }
	st := e.waitStatus(second, "rejected", rejected)
	require.Equal(t, "OutOfcpu", st.Reason)
	require.Equal(t, "Pod was rejected: Node didn't have enough resource: cpu, requested: 600, used: 600, capacity: 1000", st.Message)
	requireNoSandbox(t, e, second)

	stop()
	e.pub = &recorder{}
	e.run(cfg)
	e.waitStatus(first, "running after restart", running)
	e.waitStatus(second, "rejected after restart", rejected)
	requireNoSandbox(t, e, second)
	st, _ = e.pub.status(t, string(first.UID))
	require.Equal(t, int32(0), st.ContainerStatuses[0].RestartCount)
}

func requireNoSandbox(t *testing.T, e *env, p *corev1.Pod) {
	t.Helper()
	sbs, err := e.h.Runtime.ListPodSandbox(e.ctx, &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(p.UID)},
	})
	require.NoError(t, err)
	require.Empty(t, sbs)
	require.Empty(t, e.containers(p.UID))
}
