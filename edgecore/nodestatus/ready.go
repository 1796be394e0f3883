package nodestatus

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	cri "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Runtime tells whether the node's container runtime can run pods. It is
// implemented by CRI (over any CRI runtime service) and, in tests, by
// anything that answers.
type Runtime interface {
	// RuntimeStatus asks the runtime now. An error means it did not
	// answer (unreachable, or the call failed).
	RuntimeStatus(ctx context.Context) (RuntimeState, error)
}

// RuntimeState is a runtime's answer.
type RuntimeState struct {
	// Version is the Node's containerRuntimeVersion: "<name>://<version>",
	// e.g. "containerd://1.6.20" (CRI Version's RuntimeName and
	// RuntimeVersion).
	Version string
	// RuntimeReady and NetworkReady are the CRI Status conditions of those
	// names.
	RuntimeReady, NetworkReady bool
	// RuntimeProblem and NetworkProblem say why the condition of that
	// name is false ("<reason>: <message>" of CRI Status); empty when it
	// is true.
	RuntimeProblem, NetworkProblem string
}

// Reasons of the Ready condition.
const (
	// ReasonReady: the node can run pods (or, with RequireRuntime false and
	// no Runtime, EdgeCore runs).
	ReasonReady = "EdgeCoreReady"
	// ReasonRuntimeUnreachable: no runtime is configured, or it did not
	// answer.
	ReasonRuntimeUnreachable = "ContainerRuntimeUnreachable"
	// ReasonRuntimeNotReady: the runtime answered RuntimeReady false.
	ReasonRuntimeNotReady = "ContainerRuntimeNotReady"
	// ReasonNetworkNotReady: the runtime answered NetworkReady false and
	// the node requires its network (CNI).
	ReasonNetworkNotReady = "NetworkNotReady"
)

// readiness is the Ready condition's status, reason and message.
type readiness struct {
	status          corev1.ConditionStatus
	reason, message string
}

// ready decides the Ready condition from the runtime's answer (st, err),
// or from its absence (configured false). It is pure; Reporter.probe asks.
func ready(configured bool, st RuntimeState, err error, requireRuntime, requireNetwork bool) readiness {
	switch {
	case !configured && !requireRuntime:
		return readiness{corev1.ConditionTrue, ReasonReady, "edgecore is running; this node has no container runtime configured"}
	case !configured:
		return readiness{corev1.ConditionFalse, ReasonRuntimeUnreachable, "no container runtime is configured"}
	case err != nil:
		return readiness{corev1.ConditionFalse, ReasonRuntimeUnreachable, fmt.Sprintf("container runtime did not answer: %v", err)}
	case !st.RuntimeReady:
		return readiness{corev1.ConditionFalse, ReasonRuntimeNotReady, notReady("container runtime is not ready", st.RuntimeProblem)}
	case requireNetwork && !st.NetworkReady:
		return readiness{corev1.ConditionFalse, ReasonNetworkNotReady, notReady("container runtime network is not ready", st.NetworkProblem)}
	}
	return readiness{corev1.ConditionTrue, ReasonReady, fmt.Sprintf("edgecore is posting ready status; container runtime %s is ready", st.Version)}
}

func notReady(what, problem string) string {
	if problem == "" {
		return what
	}
	return what + ": " + problem
}

// CRI adapts a CRI runtime service (the shim's, or containerd's) to
// Runtime: Version for the version, Status for the conditions.
type CRI struct{ Service cri.RuntimeService }

// RuntimeStatus implements Runtime.
func (c CRI) RuntimeStatus(ctx context.Context) (RuntimeState, error) {
	v, err := c.Service.Version(ctx, "v1")
	if err != nil {
		return RuntimeState{}, fmt.Errorf("get runtime version: %w", err)
	}
	s, err := c.Service.Status(ctx, false)
	if err != nil {
		return RuntimeState{}, fmt.Errorf("get runtime status: %w", err)
	}
	st := RuntimeState{Version: v.GetRuntimeName() + "://" + v.GetRuntimeVersion()}
	for _, c := range s.GetStatus().GetConditions() {
		problem := ""
		if !c.GetStatus() {
			problem = c.GetReason() + ": " + c.GetMessage()
		}
		switch c.GetType() {
		case runtimeapi.RuntimeReady:
			st.RuntimeReady, st.RuntimeProblem = c.GetStatus(), problem
		case runtimeapi.NetworkReady:
			st.NetworkReady, st.NetworkProblem = c.GetStatus(), problem
		}
	}
	return st, nil
}
