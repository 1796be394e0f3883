package pods_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/pods"
)

// A pod's runtimeClassName picks its runtime handler (a class mapped to
// containerd's runc runs), and a class the node does not know starts
// nothing: its container waits with reason RuntimeClassNotFound.
func TestRuntimeClassName(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{RuntimeHandlers: map[string]string{"fast": "runc"}})
	fast, unknown := "fast", "kata"
	ok := busyboxPod(e.h, "classed", corev1.RestartPolicyAlways, true, "sleep", "3600")
	ok.Spec.RuntimeClassName = &fast
	bad := busyboxPod(e.h, "unclassed", corev1.RestartPolicyAlways, true, "sleep", "3600")
	bad.Spec.RuntimeClassName = &unknown
	e.put(ok, bad)

	e.waitStatus(ok, "running", running)
	sbs, err := e.h.Runtime.ListPodSandbox(e.ctx, &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(ok.UID)},
	})
	require.NoError(t, err)
	require.Len(t, sbs, 1)
	require.Equal(t, "runc", sbs[0].GetRuntimeHandler(), "the class's handler reached RunPodSandbox")

	st := e.waitStatus(bad, "RuntimeClassNotFound", func(st corev1.PodStatus) bool {
		return len(st.ContainerStatuses) == 1 && st.ContainerStatuses[0].State.Waiting != nil &&
			st.ContainerStatuses[0].State.Waiting.Reason == "RuntimeClassNotFound"
	})
	require.Equal(t, corev1.PodPending, st.Phase)
	require.Contains(t, st.ContainerStatuses[0].State.Waiting.Message, `RuntimeClass "kata" is not configured on this node (known: "fast")`)
	require.Never(t, func() bool {
		sbs, err := e.h.Runtime.ListPodSandbox(e.ctx, &runtimeapi.PodSandboxFilter{
			LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(bad.UID)},
		})
		return err != nil || len(sbs) > 0
	}, time.Second, 100*time.Millisecond, "no sandbox for an unknown class")
}
