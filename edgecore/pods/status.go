package pods

import (
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// waitReason is why a container is not running although it should: the
// reason and message of its Waiting state.
type waitReason struct {
	Reason, Message string
}

// observation is what the status of a pod is computed from: everything
// the runtime said, plus what the last sync decided. It is plain data, so
// computeStatus is pure.
type observation struct {
	pod *corev1.Pod
	// prev is the status published last (or the stored one): it keeps the
	// transition times and the start time.
	prev corev1.PodStatus
	// sandbox is the status of the pod's ready sandbox, nil when none.
	sandbox *runtimeapi.PodSandboxStatus
	// containers are the instances of each container, newest first.
	containers map[string][]*runtimeapi.ContainerStatus
	// waiting is why a container waits, by name.
	waiting map[string]waitReason
	// probes are the probe results of running containers, by container ID.
	probes      map[string]probeResult
	hostIPs     []string
	runtimeName string
	now         time.Time
	// vm: the pod runs on the VM handler; guest is the VM backend's guest
	// info by container id (vm.go).
	vm    bool
	guest map[string]string
}

// computeStatus returns the status a kubelet would write for o.
func computeStatus(o observation) corev1.PodStatus {
	pod := o.pod
	st := corev1.PodStatus{QOSClass: pod.Status.QOSClass}
	st.StartTime = o.prev.StartTime
	if st.StartTime == nil {
		t := metav1.NewTime(o.now)
		st.StartTime = &t
	}
	for _, ip := range o.hostIPs {
		st.HostIPs = append(st.HostIPs, corev1.HostIP{IP: ip})
	}
	if len(o.hostIPs) > 0 {
		st.HostIP = o.hostIPs[0]
	}
	var podIPs []string
	if hostNetwork(pod) {
		podIPs = o.hostIPs
	} else if n := o.sandbox.GetNetwork(); n != nil && n.Ip != "" {
		podIPs = append(podIPs, n.Ip)
		for _, ip := range n.AdditionalIps {
			podIPs = append(podIPs, ip.Ip)
		}
	}
	for _, ip := range podIPs {
		st.PodIPs = append(st.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(podIPs) > 0 {
		st.PodIP = podIPs[0]
	}

	initDone, initFailed := true, false
	var initPending []string
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		cs := o.containerStatus(c, "PodInitializing")
		st.InitContainerStatuses = append(st.InitContainerStatuses, cs)
		if t := cs.State.Terminated; t != nil && t.ExitCode == 0 {
			continue
		}
		initDone = false
		initPending = append(initPending, c.Name)
		if t := lastExit(cs); t != nil && t.ExitCode != 0 {
			initFailed = true
		}
	}
	appWait := "ContainerCreating"
	if !initDone {
		appWait = "PodInitializing"
	}
	var unready []string
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		cs := o.containerStatus(c, appWait)
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
		if !cs.Ready {
			unready = append(unready, c.Name)
		}
	}

	switch {
	case initFailed && pod.Spec.RestartPolicy == corev1.RestartPolicyNever:
		st.Phase = corev1.PodFailed
	case !initDone:
		st.Phase = corev1.PodPending
	default:
		st.Phase = appPhase(pod.Spec.RestartPolicy, st.ContainerStatuses)
	}

	cond := func(t corev1.PodConditionType, ok bool, reason, msg string) {
		c := corev1.PodCondition{Type: t, Status: corev1.ConditionFalse, Reason: reason, Message: msg}
		if ok {
			c.Status, c.Reason, c.Message = corev1.ConditionTrue, "", ""
		}
		c.LastTransitionTime = metav1.NewTime(o.now)
		for _, p := range o.prev.Conditions {
			if p.Type == t && p.Status == c.Status {
				c.LastTransitionTime = p.LastTransitionTime
			}
		}
		st.Conditions = append(st.Conditions, c)
	}
	// SANDBOX_READY is the zero value: a nil sandbox would read as ready.
	sandboxReady := o.sandbox != nil && o.sandbox.GetState() == runtimeapi.PodSandboxState_SANDBOX_READY
	cond(corev1.PodReadyToStartContainers, sandboxReady, "", "")
	cond(corev1.PodInitialized, initDone, "ContainersNotInitialized",
		fmt.Sprintf("containers with incomplete status: [%s]", strings.Join(initPending, " ")))
	readyReason, readyMsg := "ContainersNotReady", fmt.Sprintf("containers with unready status: [%s]", strings.Join(unready, " "))
	if st.Phase == corev1.PodSucceeded {
		readyReason, readyMsg = "PodCompleted", ""
	}
	allReady := len(unready) == 0 && st.Phase == corev1.PodRunning
	cond(corev1.ContainersReady, allReady, readyReason, readyMsg)
	cond(corev1.PodReady, allReady, readyReason, readyMsg)
	cond(corev1.PodScheduled, true, "", "")
	if o.vm {
		st.Conditions = append(st.Conditions, vmConditions(o)...)
	}
	return st
}

// appPhase is kubelet's getPhase for the app containers.
func appPhase(policy corev1.RestartPolicy, statuses []corev1.ContainerStatus) corev1.PodPhase {
	var waiting, running, stopped, succeeded, failed int
	for _, cs := range statuses {
		switch {
		case cs.State.Running != nil:
			running++
		case cs.State.Terminated != nil || cs.LastTerminationState.Terminated != nil:
			stopped++
			if lastExit(cs).ExitCode == 0 {
				succeeded++
			} else {
				failed++
			}
		default:
			waiting++
		}
	}
	switch {
	case waiting > 0:
		return corev1.PodPending
	case running > 0:
		return corev1.PodRunning
	case stopped > 0:
		switch policy {
		case corev1.RestartPolicyAlways:
			return corev1.PodRunning
		case corev1.RestartPolicyOnFailure:
			if stopped == succeeded {
				return corev1.PodSucceeded
			}
			return corev1.PodRunning
		default:
			if failed > 0 {
				return corev1.PodFailed
			}
			return corev1.PodSucceeded
		}
	}
	return corev1.PodPending
}

// lastExit is the container's current termination, else its last one.
func lastExit(cs corev1.ContainerStatus) *corev1.ContainerStateTerminated {
	if cs.State.Terminated != nil {
		return cs.State.Terminated
	}
	return cs.LastTerminationState.Terminated
}

// containerStatus is the status of spec container c. wait is the reason
// shown while no instance exists and none is known to be blocked.
func (o observation) containerStatus(c *corev1.Container, wait string) corev1.ContainerStatus {
	cs := corev1.ContainerStatus{Name: c.Name, Image: c.Image}
	list := o.containers[c.Name]
	w, blocked := o.waiting[c.Name]
	if len(list) == 0 {
		if !blocked {
			w = waitReason{Reason: wait}
		}
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: w.Reason, Message: w.Message}
		return cs
	}
	latest := list[0]
	cs.ContainerID = o.runtimeName + "://" + latest.GetId()
	cs.ImageID = latest.GetImageRef()
	cs.RestartCount = int32(latest.GetMetadata().GetAttempt())
	var prev *runtimeapi.ContainerStatus
	if len(list) > 1 {
		prev = list[1]
	}
	switch latest.GetState() {
	case runtimeapi.ContainerState_CONTAINER_RUNNING:
		cs.State.Running = &corev1.ContainerStateRunning{StartedAt: nanoTime(latest.GetStartedAt())}
		started, ready := true, true
		r, tracked := o.probes[latest.GetId()]
		if c.StartupProbe != nil {
			started = tracked && r.started
		}
		if c.ReadinessProbe != nil {
			ready = tracked && r.ready
		}
		cs.Started, cs.Ready = ptr(started), started && ready
	case runtimeapi.ContainerState_CONTAINER_EXITED:
		if blocked {
			// Waiting to be replaced (CrashLoopBackOff): the exit is the
			// last state.
			cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: w.Reason, Message: w.Message}
			cs.LastTerminationState.Terminated = terminated(o.runtimeName, latest)
			cs.Started = ptr(false)
			return cs
		}
		cs.State.Terminated = terminated(o.runtimeName, latest)
		cs.Started = ptr(false)
	default:
		if !blocked {
			w = waitReason{Reason: "ContainerCreating"}
		}
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: w.Reason, Message: w.Message}
		cs.Started = ptr(false)
	}
	if prev != nil && prev.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED {
		cs.LastTerminationState.Terminated = terminated(o.runtimeName, prev)
	}
	return cs
}

func terminated(runtimeName string, s *runtimeapi.ContainerStatus) *corev1.ContainerStateTerminated {
	reason := s.GetReason()
	if reason == "" {
		reason = "Error"
		if s.GetExitCode() == 0 {
			reason = "Completed"
		}
	}
	return &corev1.ContainerStateTerminated{
		ExitCode:    s.GetExitCode(),
		Reason:      reason,
		Message:     s.GetMessage(),
		StartedAt:   nanoTime(s.GetStartedAt()),
		FinishedAt:  nanoTime(s.GetFinishedAt()),
		ContainerID: runtimeName + "://" + s.GetId(),
	}
}

func nanoTime(ns int64) metav1.Time {
	if ns == 0 {
		return metav1.Time{}
	}
	return metav1.NewTime(time.Unix(0, ns))
}

func ptr[T any](v T) *T { return &v }

// sortInstances orders instances newest first: by attempt, then creation.
func sortInstances(list []*runtimeapi.ContainerStatus) {
	slices.SortFunc(list, func(a, b *runtimeapi.ContainerStatus) int {
		if d := int64(b.GetMetadata().GetAttempt()) - int64(a.GetMetadata().GetAttempt()); d != 0 {
			return int(d)
		}
		switch {
		case b.GetCreatedAt() > a.GetCreatedAt():
			return 1
		case b.GetCreatedAt() < a.GetCreatedAt():
			return -1
		}
		return 0
	})
}
