package pods

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Pods of other runtime handlers, and the virtual machines among them.
//
// A pod's runtimeClassName picks its CRI runtime handler through
// Config.RuntimeHandlers; the handler goes into RunPodSandbox and into the
// ImageSpec of the image checks and of CreateContainer, so that the CRI
// shim routes both to the right backend. Pods of Config.VMHandler are
// virtual machines: their containers' statuses are read verbose, and the
// VM backend's guest info (Info[guestInfoKey], JSON
// {"bootedAt","acceleration","console"}) becomes two pod conditions the
// cloud's VM controller reads:
//
//	vm.edge.tether.dev/GuestBooted  True, reason BootMarkerSeen, when the
//	    running guest printed its boot marker (lastTransitionTime: when it
//	    was seen); False with BootMarkerNotSeen before, GuestStopped after.
//	    The message is "acceleration=kvm" or "acceleration=tcg".
//	vm.edge.tether.dev/Console  True; the message is the console's last
//	    lines, which the backend takes only at changes of state (boot seen,
//	    guest stopped), so a chatty guest causes no status writes.

// DefaultVMHandler is the runtime handler (and RuntimeClass name) of
// virtual machines.
const DefaultVMHandler = "tether-vm"

// The VM conditions and the backend's guest info key.
const (
	ConditionGuestBooted corev1.PodConditionType = "vm.edge.tether.dev/GuestBooted"
	ConditionConsole     corev1.PodConditionType = "vm.edge.tether.dev/Console"
	guestInfoKey                                 = "vm.edge.tether.dev/guest"
)

// guestInfo is the VM backend's Info[guestInfoKey].
type guestInfo struct {
	BootedAt     string `json:"bootedAt"`
	Acceleration string `json:"acceleration"`
	Console      string `json:"console"`
}

// handler is the runtime handler of pod's runtimeClassName.
func (m *Manager) handler(pod *corev1.Pod) (string, error) {
	rc := pod.Spec.RuntimeClassName
	if rc == nil || *rc == "" {
		return "", nil
	}
	if h, ok := m.cfg.RuntimeHandlers[*rc]; ok {
		return h, nil
	}
	known := make([]string, 0, len(m.cfg.RuntimeHandlers))
	for k := range m.cfg.RuntimeHandlers {
		known = append(known, fmt.Sprintf("%q", k))
	}
	sort.Strings(known)
	return "", fmt.Errorf("RuntimeClass %q is not configured on this node (known: %s)", *rc, strings.Join(known, ", "))
}

// isVM reports whether pod runs on the VM handler.
func (m *Manager) isVM(pod *corev1.Pod) bool {
	h, err := m.handler(pod)
	return err == nil && h != "" && h == m.cfg.VMHandler
}

// vmConditions are the VM conditions of o, from the newest instance of the
// pod's first container that has guest info.
func vmConditions(o observation) []corev1.PodCondition {
	var (
		latest *runtimeapi.ContainerStatus
		gi     guestInfo
	)
	for _, c := range slices.Concat(o.pod.Spec.InitContainers, o.pod.Spec.Containers) {
		for _, inst := range o.containers[c.Name] {
			raw, ok := o.guest[inst.GetId()]
			if !ok {
				continue
			}
			if err := json.Unmarshal([]byte(raw), &gi); err != nil {
				continue
			}
			latest = inst
			break
		}
		if latest != nil {
			break
		}
	}
	if latest == nil {
		return nil
	}
	prev := func(t corev1.PodConditionType, s corev1.ConditionStatus) metav1.Time {
		for _, p := range o.prev.Conditions {
			if p.Type == t && p.Status == s {
				return p.LastTransitionTime
			}
		}
		return metav1.NewTime(o.now)
	}
	booted := corev1.PodCondition{Type: ConditionGuestBooted, Message: "acceleration=" + gi.Acceleration}
	bootedAt, err := time.Parse(time.RFC3339Nano, gi.BootedAt)
	switch {
	case latest.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED:
		booted.Status, booted.Reason = corev1.ConditionFalse, "GuestStopped"
	case gi.BootedAt != "" && err == nil:
		booted.Status, booted.Reason = corev1.ConditionTrue, "BootMarkerSeen"
		booted.LastTransitionTime = metav1.NewTime(bootedAt)
	default:
		booted.Status, booted.Reason = corev1.ConditionFalse, "BootMarkerNotSeen"
	}
	if booted.LastTransitionTime.IsZero() {
		booted.LastTransitionTime = prev(booted.Type, booted.Status)
	}
	out := []corev1.PodCondition{booted}
	if gi.Console != "" {
		console := corev1.PodCondition{Type: ConditionConsole, Status: corev1.ConditionTrue, Message: gi.Console}
		console.LastTransitionTime = prev(console.Type, console.Status)
		out = append(out, console)
	}
	return out
}
