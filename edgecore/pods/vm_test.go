package pods

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func vmPod(class string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "vm", Namespace: "default", UID: "uid-vm"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "compute", Image: "tether-guest"}}},
	}
	if class != "" {
		p.Spec.RuntimeClassName = &class
	}
	return p
}

func TestRuntimeClassToHandler(t *testing.T) {
	m := &Manager{cfg: Config{}.withDefaults()}
	h, err := m.handler(vmPod(""))
	require.NoError(t, err)
	require.Empty(t, h, "no runtimeClassName: the default handler")
	h, err = m.handler(vmPod("tether-vm"))
	require.NoError(t, err)
	require.Equal(t, "tether-vm", h)
	require.True(t, m.isVM(vmPod("tether-vm")))
	require.False(t, m.isVM(vmPod("")))
	_, err = m.handler(vmPod("kata"))
	require.ErrorContains(t, err, `RuntimeClass "kata" is not configured on this node (known: "tether-vm")`)

	m = &Manager{cfg: Config{RuntimeHandlers: map[string]string{"fast": "runc", "vm": "tether-vm"}}.withDefaults()}
	h, err = m.handler(vmPod("fast"))
	require.NoError(t, err)
	require.Equal(t, "runc", h)
	require.False(t, m.isVM(vmPod("fast")))
	require.True(t, m.isVM(vmPod("vm")), "the VM handler, whatever the class is called")
}

func TestVMConditions(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	booted := t0.Add(3 * time.Second)
	sb := &runtimeapi.PodSandboxStatus{State: runtimeapi.PodSandboxState_SANDBOX_READY}
	run := instance("compute", 0, runtimeapi.ContainerState_CONTAINER_RUNNING, 0, t0.UnixNano(), 0)
	obs := func(prev corev1.PodStatus, now time.Time, c *runtimeapi.ContainerStatus, info string) observation {
		return observation{
			pod: vmPod("tether-vm"), prev: prev, sandbox: sb, now: now, vm: true,
			containers: map[string][]*runtimeapi.ContainerStatus{"compute": {c}},
			guest:      map[string]string{c.GetId(): info},
		}
	}
	cond := func(st corev1.PodStatus, t corev1.PodConditionType) *corev1.PodCondition {
		for i := range st.Conditions {
			if st.Conditions[i].Type == t {
				return &st.Conditions[i]
			}
		}
		return nil
	}

	first := computeStatus(obs(corev1.PodStatus{}, t0, run, `{"bootedAt":"","acceleration":"tcg","console":""}`))
	c := cond(first, ConditionGuestBooted)
	require.NotNil(t, c)
	require.Equal(t, corev1.ConditionFalse, c.Status)
	require.Equal(t, "BootMarkerNotSeen", c.Reason)
	require.Equal(t, "acceleration=tcg", c.Message)
	require.Nil(t, cond(first, ConditionConsole), "no console yet: no condition")

	info := `{"bootedAt":"` + booted.UTC().Format(time.RFC3339Nano) + `","acceleration":"tcg","console":"Linux\nTETHER-GUEST-BOOTED"}`
	second := computeStatus(obs(first, t0.Add(5*time.Second), run, info))
	c = cond(second, ConditionGuestBooted)
	require.Equal(t, corev1.ConditionTrue, c.Status)
	require.Equal(t, "BootMarkerSeen", c.Reason)
	require.True(t, c.LastTransitionTime.Time.Equal(booted), "when the marker was seen, not when the status was computed")
	con := cond(second, ConditionConsole)
	require.Equal(t, corev1.ConditionTrue, con.Status)
	require.Equal(t, "Linux\nTETHER-GUEST-BOOTED", con.Message)

	// The same guest info later gives the same conditions: no new write.
	third := computeStatus(obs(second, t0.Add(time.Minute), run, info))
	require.Equal(t, cond(second, ConditionConsole), cond(third, ConditionConsole))
	require.Equal(t, cond(second, ConditionGuestBooted), cond(third, ConditionGuestBooted))

	stopped := instance("compute", 0, runtimeapi.ContainerState_CONTAINER_EXITED, 0, t0.UnixNano(), t0.Add(time.Minute).UnixNano())
	fourth := computeStatus(obs(third, t0.Add(2*time.Minute), stopped, info))
	c = cond(fourth, ConditionGuestBooted)
	require.Equal(t, corev1.ConditionFalse, c.Status)
	require.Equal(t, "GuestStopped", c.Reason)

	// Bad guest info adds nothing; a pod of another handler gets nothing.
	bad := obs(corev1.PodStatus{}, t0, run, `{not json`)
	require.Nil(t, cond(computeStatus(bad), ConditionGuestBooted))
	other := obs(corev1.PodStatus{}, t0, run, info)
	other.vm = false
	require.Nil(t, cond(computeStatus(other), ConditionGuestBooted))
}
