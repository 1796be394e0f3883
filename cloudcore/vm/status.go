package vm

import (
	"strings"
	"time"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The pod conditions the edge's pods manager adds to VM pods (issue 9's
// contract).
const (
	PodConditionGuestBooted corev1.PodConditionType = "vm.edge.tether.dev/GuestBooted"
	PodConditionConsole     corev1.PodConditionType = "vm.edge.tether.dev/Console"
)

// Bounds of the console tail kept in the status; longer tails from the
// edge are cut to their end.
const (
	MaxConsoleLines = 20
	MaxConsoleBytes = 2 << 10
)

// The VirtualMachine's conditions.
const (
	// ConditionReady is True while the guest runs (phase Running); False
	// has the phase's reason.
	ConditionReady = "Ready"
	// ConditionGuestBooted mirrors the pod's GuestBooted condition for the
	// current start of the compute container; its lastTransitionTime is
	// the boot time.
	ConditionGuestBooted = "GuestBooted"
	// ConditionSynced is False when the controller cannot make the pod the
	// spec asks for: reasons ReasonInvalidSpec, ReasonPodConflict,
	// ReasonPodWriteFailed.
	ConditionSynced = "Synced"
	// ConditionRestartRequired is True (reason ReasonSpecChanged) when the
	// spec changed since the running pod was made: pods are immutable, so
	// the change applies at the next start (running false, then true). A
	// pod that already failed or completed is replaced at once.
	ConditionRestartRequired = "RestartRequired"
)

// Reasons the controller gives (the pod's own reasons, e.g. OutOfcpu or
// ContainerCreating, are passed through).
const (
	ReasonBootMarkerSeen  = "BootMarkerSeen"
	ReasonInvalidSpec     = "InvalidSpec"
	ReasonPodConflict     = "PodConflict"
	ReasonPodWriteFailed  = "PodWriteFailed"
	ReasonPodInSync       = "PodInSync"
	ReasonSpecChanged     = "SpecChanged"
	ReasonNoPod           = "NoPod"
	ReasonStopped         = "Stopped"
	ReasonPodTerminating  = "PodTerminating"
	ReasonPodFailed       = "PodFailed"
	ReasonPodCompleted    = "PodCompleted"
	ReasonUnscheduled     = "Unscheduled"
	ReasonNotStarted      = "ContainerNotRunning"
	ReasonWaitingForGuest = "WaitingForBootMarker"
)

// observation is what the controller learned this round, besides the pod.
type observation struct {
	specErr         error  // the spec is invalid
	conflict        string // a pod the VM does not control holds its name
	writeErr        error  // creating or deleting the pod failed
	restartRequired bool   // the live pod was made from an older spec
}

// badInput causes, for what the edge wrote in the pod's status.
const (
	causeAcceleration = "bad_acceleration"
	causeConsoleLong  = "console_too_long"
	causeConsoleUTF8  = "console_invalid_utf8"
)

// computeStatus returns v's status given its pod (nil: none) and the
// round's observation, and the causes of anything it refused in the pod's
// status. It is pure: conditions keep their lastTransitionTime unless
// their status changes (then it is now, or the boot time).
func computeStatus(v *VirtualMachine, pod *corev1.Pod, obs observation, now time.Time) (Status, []string) {
	old := v.Status
	st := Status{ObservedGeneration: v.Generation, Acceleration: old.Acceleration, Console: old.Console}
	st.Conditions = make([]metav1.Condition, len(old.Conditions))
	for i := range old.Conditions {
		st.Conditions[i] = *old.Conditions[i].DeepCopy()
	}
	var bad []string
	var booted *metav1.Time
	if pod != nil {
		st.PodName, st.NodeName = pod.Name, pod.Spec.NodeName
		var cause string
		booted, cause = bootOf(pod, &st)
		if cause != "" {
			bad = append(bad, cause)
		}
		if c := podCondition(pod, PodConditionConsole); c != nil {
			var causes []string
			st.Console, causes = boundConsole(c.Message)
			bad = append(bad, causes...)
		}
	}
	st.Phase, st.Reason, st.Message = phaseOf(v, pod, obs, booted)
	if st.Phase == PhaseRunning {
		st.BootTime = booted
	}

	set := func(typ string, ok bool, reason, msg string, at metav1.Time) {
		s := metav1.ConditionFalse
		if ok {
			s = metav1.ConditionTrue
		}
		if at.IsZero() {
			at = metav1.NewTime(now)
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{
			Type: typ, Status: s, Reason: reason, Message: msg, ObservedGeneration: v.Generation, LastTransitionTime: at,
		})
	}
	readyMsg := st.Message
	if st.Phase == PhaseRunning {
		readyMsg = "the guest booted"
	}
	set(ConditionReady, st.Phase == PhaseRunning, reasonOr(st.Reason, ReasonBootMarkerSeen), readyMsg, metav1.Time{})
	if st.BootTime != nil {
		set(ConditionGuestBooted, true, ReasonBootMarkerSeen, "acceleration="+st.Acceleration, *st.BootTime)
	} else {
		set(ConditionGuestBooted, false, reasonOr(st.Reason, ReasonWaitingForGuest), "the boot marker was not seen since the guest last started", metav1.Time{})
	}
	switch {
	case obs.specErr != nil:
		set(ConditionSynced, false, ReasonInvalidSpec, obs.specErr.Error(), metav1.Time{})
	case obs.conflict != "":
		set(ConditionSynced, false, ReasonPodConflict, obs.conflict, metav1.Time{})
	case obs.writeErr != nil:
		set(ConditionSynced, false, ReasonPodWriteFailed, obs.writeErr.Error(), metav1.Time{})
	default:
		set(ConditionSynced, true, ReasonPodInSync, "the pod is what the spec asks for", metav1.Time{})
	}
	if obs.restartRequired {
		set(ConditionRestartRequired, true, ReasonSpecChanged, "the spec changed since the VM started; set running to false and back to true to apply it", metav1.Time{})
	} else {
		set(ConditionRestartRequired, false, ReasonPodInSync, "the running VM has the current spec", metav1.Time{})
	}
	return st, bad
}

func reasonOr(r, def string) string {
	if r == "" {
		return def
	}
	return r
}

// phaseOf is the phase table of docs/runtime.md ("Virtual machines").
func phaseOf(v *VirtualMachine, pod *corev1.Pod, obs observation, booted *metav1.Time) (Phase, string, string) {
	running := v.Spec.IsRunning()
	if pod == nil {
		switch {
		case obs.specErr != nil && running:
			return PhaseFailed, ReasonInvalidSpec, obs.specErr.Error()
		case !running:
			return PhaseStopped, ReasonStopped, "spec.running is false"
		case obs.conflict != "":
			return PhasePending, ReasonPodConflict, obs.conflict
		case obs.writeErr != nil:
			return PhasePending, ReasonPodWriteFailed, obs.writeErr.Error()
		default:
			return PhasePending, ReasonNoPod, "the pod is being created"
		}
	}
	switch pod.Status.Phase {
	case corev1.PodFailed:
		return PhaseFailed, reasonOr(pod.Status.Reason, ReasonPodFailed), pod.Status.Message
	case corev1.PodSucceeded:
		return PhaseStopped, ReasonPodCompleted, "the pod completed"
	}
	if pod.DeletionTimestamp != nil || !running {
		return PhaseStopping, ReasonPodTerminating, "the pod is being deleted"
	}
	if pod.Spec.NodeName == "" {
		if c := podCondition(pod, corev1.PodScheduled); c != nil && c.Status == corev1.ConditionFalse {
			return PhasePending, reasonOr(c.Reason, ReasonUnscheduled), c.Message
		}
		return PhasePending, ReasonUnscheduled, "the pod is not bound to a node yet"
	}
	cs := computeStatusOf(pod)
	if cs == nil || cs.State.Running == nil {
		reason, msg := ReasonNotStarted, "the VM's sandbox or compute container is not running yet"
		switch {
		case cs != nil && cs.State.Waiting != nil && cs.State.Waiting.Reason != "":
			reason, msg = cs.State.Waiting.Reason, cs.State.Waiting.Message
		case cs != nil && cs.State.Terminated != nil && cs.State.Terminated.Reason != "":
			reason, msg = cs.State.Terminated.Reason, cs.State.Terminated.Message
		}
		return PhaseScheduled, reason, msg
	}
	if booted == nil {
		return PhaseBooting, ReasonWaitingForGuest, "the guest is booting"
	}
	return PhaseRunning, "", ""
}

// bootOf returns when the guest booted since the compute container last
// started (nil: not since), from the pod's GuestBooted condition, and
// records the acceleration it names in st. A boot seen before the current
// start (second precision, as the API keeps times) is an earlier boot.
// It returns a bad-input cause when the condition's message is not the
// contract's.
func bootOf(pod *corev1.Pod, st *Status) (*metav1.Time, string) {
	c := podCondition(pod, PodConditionGuestBooted)
	if c == nil {
		return nil, ""
	}
	cause := ""
	switch acc, ok := strings.CutPrefix(c.Message, "acceleration="); {
	case ok && (acc == "kvm" || acc == "tcg"):
		st.Acceleration = acc
	case c.Message != "" || c.Status == corev1.ConditionTrue:
		cause = causeAcceleration
	}
	if c.Status != corev1.ConditionTrue || c.LastTransitionTime.IsZero() {
		return nil, cause
	}
	if cs := computeStatusOf(pod); cs != nil && cs.State.Running != nil && c.LastTransitionTime.Before(&cs.State.Running.StartedAt) {
		return nil, cause
	}
	t := c.LastTransitionTime
	return &t, cause
}

// boundConsole returns the last MaxConsoleLines lines of s, at most
// MaxConsoleBytes bytes of valid UTF-8, and the causes of any cut.
func boundConsole(s string) (string, []string) {
	var causes []string
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
		causes = append(causes, causeConsoleUTF8)
	}
	cut := false
	lines := strings.SplitAfter(s, "\n")
	if lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	if len(lines) > MaxConsoleLines {
		s = strings.Join(lines[len(lines)-MaxConsoleLines:], "")
		cut = true
	}
	if len(s) > MaxConsoleBytes {
		s = s[len(s)-MaxConsoleBytes:]
		for len(s) > 0 && !utf8.RuneStart(s[0]) {
			s = s[1:]
		}
		cut = true
	}
	if cut {
		causes = append(causes, causeConsoleLong)
	}
	return s, causes
}

func podCondition(pod *corev1.Pod, t corev1.PodConditionType) *corev1.PodCondition {
	for i := range pod.Status.Conditions {
		if pod.Status.Conditions[i].Type == t {
			return &pod.Status.Conditions[i]
		}
	}
	return nil
}

func computeStatusOf(pod *corev1.Pod) *corev1.ContainerStatus {
	for i := range pod.Status.ContainerStatuses {
		if pod.Status.ContainerStatuses[i].Name == ContainerName {
			return &pod.Status.ContainerStatuses[i]
		}
	}
	return nil
}
