package nodestatus

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
)

func TestReady(t *testing.T) {
	up := RuntimeState{Version: "containerd://1.6.20", RuntimeReady: true, NetworkReady: true}
	noNet := RuntimeState{Version: "containerd://1.6.20", RuntimeReady: true, NetworkProblem: "NetworkPluginNotReady: cni config uninitialized"}
	down := RuntimeState{Version: "containerd://1.6.20", RuntimeProblem: "Broken: no shim", NetworkReady: true}
	for _, tc := range []struct {
		name                           string
		configured                     bool
		st                             RuntimeState
		err                            error
		requireRuntime, requireNetwork bool
		want                           readiness
	}{
		{name: "no runtime, none required", want: readiness{corev1.ConditionTrue, ReasonReady, "edgecore is running; this node has no container runtime configured"}},
		{name: "no runtime, one required", requireRuntime: true, want: readiness{corev1.ConditionFalse, ReasonRuntimeUnreachable, "no container runtime is configured"}},
		{name: "unreachable", configured: true, err: errors.New("dial unix /run/c.sock: connect: no such file"),
			want: readiness{corev1.ConditionFalse, ReasonRuntimeUnreachable, "container runtime did not answer: dial unix /run/c.sock: connect: no such file"}},
		{name: "not asked yet", configured: true, err: errNotAsked, requireRuntime: false,
			want: readiness{corev1.ConditionFalse, ReasonRuntimeUnreachable, "container runtime did not answer: not asked yet"}},
		{name: "runtime not ready", configured: true, st: down,
			want: readiness{corev1.ConditionFalse, ReasonRuntimeNotReady, "container runtime is not ready: Broken: no shim"}},
		{name: "runtime not ready, no reason", configured: true, st: RuntimeState{},
			want: readiness{corev1.ConditionFalse, ReasonRuntimeNotReady, "container runtime is not ready"}},
		{name: "network not ready, host network", configured: true, st: noNet,
			want: readiness{corev1.ConditionTrue, ReasonReady, "edgecore is posting ready status; container runtime containerd://1.6.20 is ready"}},
		{name: "network not ready, CNI", configured: true, st: noNet, requireNetwork: true,
			want: readiness{corev1.ConditionFalse, ReasonNetworkNotReady, "container runtime network is not ready: NetworkPluginNotReady: cni config uninitialized"}},
		{name: "ready with CNI", configured: true, st: up, requireNetwork: true,
			want: readiness{corev1.ConditionTrue, ReasonReady, "edgecore is posting ready status; container runtime containerd://1.6.20 is ready"}},
		{name: "runtime error wins over state", configured: true, st: up, err: errors.New("deadline exceeded"),
			want: readiness{corev1.ConditionFalse, ReasonRuntimeUnreachable, "container runtime did not answer: deadline exceeded"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, ready(tc.configured, tc.st, tc.err, tc.requireRuntime, tc.requireNetwork))
		})
	}
}
