package vm

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// podIn builds a VM pod in a given state, as the edge would report it.
type podIn struct {
	node        string
	phase       corev1.PodPhase
	reason      string
	started     time.Time // compute running since; zero: not running
	waiting     string
	booted      time.Time // GuestBooted True at; zero: absent
	accel       string
	console     string
	terminating bool
}

func (p podIn) pod() *corev1.Pod {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "vm-v"}, Spec: corev1.PodSpec{NodeName: p.node},
		Status: corev1.PodStatus{Phase: p.phase, Reason: p.reason}}
	if p.terminating {
		now := metav1.Now()
		pod.DeletionTimestamp = &now
	}
	cs := corev1.ContainerStatus{Name: ContainerName}
	switch {
	case !p.started.IsZero():
		cs.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(p.started)}
	case p.waiting != "":
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: p.waiting}
	}
	pod.Status.ContainerStatuses = []corev1.ContainerStatus{cs}
	if !p.booted.IsZero() {
		pod.Status.Conditions = append(pod.Status.Conditions, corev1.PodCondition{
			Type: PodConditionGuestBooted, Status: corev1.ConditionTrue, Reason: ReasonBootMarkerSeen,
			Message: "acceleration=" + p.accel, LastTransitionTime: metav1.NewTime(p.booted),
		})
	}
	if p.console != "" {
		pod.Status.Conditions = append(pod.Status.Conditions, corev1.PodCondition{
			Type: PodConditionConsole, Status: corev1.ConditionTrue, Message: p.console,
		})
	}
	return pod
}

// TestPhases: the phase table of docs/runtime.md.
func TestPhases(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name    string
		stopped bool
		pod     *podIn
		obs     observation
		phase   Phase
		reason  string
		boot    bool
	}{
		{name: "no pod yet", phase: PhasePending, reason: ReasonNoPod},
		{name: "no pod, stopped", stopped: true, phase: PhaseStopped, reason: ReasonStopped},
		{name: "no pod, invalid", obs: observation{specErr: errors.New("bad")}, phase: PhaseFailed, reason: ReasonInvalidSpec},
		{name: "no pod, conflict", obs: observation{conflict: "taken"}, phase: PhasePending, reason: ReasonPodConflict},
		{name: "unbound", pod: &podIn{}, phase: PhasePending, reason: ReasonUnscheduled},
		{name: "bound, sandbox not ready", pod: &podIn{node: "e"}, phase: PhaseScheduled, reason: ReasonNotStarted},
		{name: "bound, creating", pod: &podIn{node: "e", waiting: "ContainerCreating"}, phase: PhaseScheduled, reason: "ContainerCreating"},
		{name: "container runs", pod: &podIn{node: "e", started: t0}, phase: PhaseBooting, reason: ReasonWaitingForGuest},
		{name: "booted", pod: &podIn{node: "e", started: t0, booted: t0.Add(3 * time.Second), accel: "tcg"}, phase: PhaseRunning, boot: true},
		{name: "booted the same second", pod: &podIn{node: "e", started: t0, booted: t0, accel: "kvm"}, phase: PhaseRunning, boot: true},
		{name: "boot marker of the previous start", pod: &podIn{node: "e", started: t0, booted: t0.Add(-time.Minute), accel: "tcg"}, phase: PhaseBooting, reason: ReasonWaitingForGuest},
		{name: "restarting after the guest stopped", pod: &podIn{node: "e", waiting: "CrashLoopBackOff", booted: t0, accel: "tcg"}, phase: PhaseScheduled, reason: "CrashLoopBackOff"},
		{name: "pod failed", pod: &podIn{node: "e", phase: corev1.PodFailed, reason: "OutOfcpu"}, phase: PhaseFailed, reason: "OutOfcpu"},
		{name: "pod failed, no reason", pod: &podIn{node: "e", phase: corev1.PodFailed}, phase: PhaseFailed, reason: ReasonPodFailed},
		{name: "pod completed", pod: &podIn{node: "e", phase: corev1.PodSucceeded}, phase: PhaseStopped, reason: ReasonPodCompleted},
		{name: "stopping", stopped: true, pod: &podIn{node: "e", started: t0, booted: t0, accel: "tcg"}, phase: PhaseStopping, reason: ReasonPodTerminating},
		{name: "pod terminating", pod: &podIn{node: "e", started: t0, terminating: true}, phase: PhaseStopping, reason: ReasonPodTerminating},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := &VirtualMachine{ObjectMeta: metav1.ObjectMeta{Name: "v", Generation: 3}, Spec: Spec{Running: new(!tc.stopped)}}
			var pod *corev1.Pod
			if tc.pod != nil {
				pod = tc.pod.pod()
			}
			st, bad := computeStatus(v, pod, tc.obs, t0.Add(time.Hour))
			require.Empty(t, bad)
			require.Equal(t, tc.phase, st.Phase)
			require.Equal(t, tc.reason, st.Reason)
			require.Equal(t, int64(3), st.ObservedGeneration)
			ready := meta.FindStatusCondition(st.Conditions, ConditionReady)
			require.NotNil(t, ready)
			require.Equal(t, tc.phase == PhaseRunning, ready.Status == metav1.ConditionTrue)
			booted := meta.FindStatusCondition(st.Conditions, ConditionGuestBooted)
			require.NotNil(t, booted)
			if tc.boot {
				require.NotNil(t, st.BootTime)
				require.True(t, tc.pod.booted.Equal(st.BootTime.Time))
				require.True(t, tc.pod.booted.Equal(booted.LastTransitionTime.Time), "the condition's transition is the boot")
				require.Equal(t, tc.pod.accel, st.Acceleration)
				require.Equal(t, "acceleration="+tc.pod.accel, booted.Message)
			} else {
				require.Nil(t, st.BootTime)
				require.Equal(t, metav1.ConditionFalse, booted.Status)
			}
			if tc.pod != nil {
				require.Equal(t, "vm-v", st.PodName)
				require.Equal(t, tc.pod.node, st.NodeName)
			}
		})
	}
}

// TestStatusStable: computing the status again from its own result
// changes nothing, so a resync writes nothing; a condition keeps its
// transition time while its status holds.
func TestStatusStable(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	v := &VirtualMachine{ObjectMeta: metav1.ObjectMeta{Name: "v"}}
	pod := podIn{node: "e", started: t0}.pod()
	st, _ := computeStatus(v, pod, observation{}, t0)
	v.Status = st
	again, _ := computeStatus(v, pod, observation{}, t0.Add(time.Hour))
	require.Equal(t, st, again)
}

// TestConsoleBounded: the edge's console tail is cut to its last 20 lines
// and 2 KiB of valid UTF-8, and each cut is reported as bad input.
func TestConsoleBounded(t *testing.T) {
	var lines []string
	for i := range 30 {
		lines = append(lines, "line "+string(rune('a'+i%26)))
	}
	got, causes := boundConsole(strings.Join(lines, "\n") + "\n")
	require.Equal(t, strings.Join(lines[10:], "\n")+"\n", got)
	require.Equal(t, []string{causeConsoleLong}, causes)

	got, causes = boundConsole(strings.Repeat("é", 2000)) // 4000 bytes, one line
	require.LessOrEqual(t, len(got), MaxConsoleBytes)
	require.True(t, strings.HasPrefix(got, "é"), "cut on a rune boundary")
	require.Equal(t, []string{causeConsoleLong}, causes)

	got, causes = boundConsole("ok\xff\n")
	require.Equal(t, "ok\uFFFD\n", got)
	require.Equal(t, []string{causeConsoleUTF8}, causes)

	got, causes = boundConsole("TETHER-GUEST-BOOTED\n")
	require.Equal(t, "TETHER-GUEST-BOOTED\n", got)
	require.Empty(t, causes)

	// A bad acceleration is ignored and reported.
	pod := podIn{node: "e", started: time.Now(), booted: time.Now().Add(time.Second), accel: "xen"}.pod()
	st, bad := computeStatus(&VirtualMachine{}, pod, observation{}, time.Now())
	require.Empty(t, st.Acceleration)
	require.Equal(t, []string{causeAcceleration}, bad)
}
