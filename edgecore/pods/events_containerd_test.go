package pods_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"

	"github.com/tetheredge/tether/edgecore/pods"
	ctrd "github.com/tetheredge/tether/edgecore/runtime/containerd"
)

// backendEvents feeds the manager the containerd backend's events, as
// edgecore/app does when the manager drives the in-process shim.
type backendEvents chan pods.ContainerEvent

func (ev backendEvents) Events() <-chan pods.ContainerEvent { return ev }

// TestBackendExitReachesStatus: with the relist an hour away, the
// backend's exit events alone make the manager report each exit, with no
// second look after the event. An init container that exits 0 lets the
// app container start; the app container's exit 4 fails the pod
// (restartPolicy Never). Before the backend held exits back until the CRI
// showed them, the sync an exit event triggered still saw the container
// running, and only a re-sync 300 ms later (eventSettle) caught it.
func TestBackendExitReachesStatus(t *testing.T) {
	e := newEnv(t)
	b, err := ctrd.New(e.ctx, ctrd.Config{Endpoint: e.h.Endpoint()})
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(e.ctx)
	ran := make(chan error, 1)
	go func() { ran <- b.Run(runCtx) }()
	src := b.Events(runCtx)
	ev := make(backendEvents)
	pumped := make(chan struct{})
	go func() {
		defer close(pumped)
		for x := range src {
			select {
			case ev <- pods.ContainerEvent{ContainerID: x.ContainerID}:
			case <-runCtx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-ran)
		<-pumped
		require.NoError(t, b.Close(e.ctx))
	})
	select {
	case <-b.OnReconnect():
	case <-time.After(30 * time.Second):
		require.FailNow(t, "the backend never subscribed")
	}
	e.run(pods.Config{RelistPeriod: time.Hour, Events: ev})

	p := busyboxPod(e.h, "evented-init", corev1.RestartPolicyNever, true, "sh", "-c", "sleep 1; exit 4")
	p.Spec.InitContainers = []corev1.Container{{Name: "init", Image: e.h.BusyboxImage, ImagePullPolicy: corev1.PullNever,
		Command: []string{"sh", "-c", "sleep 1"}}}
	e.put(p)
	st := e.waitStatus(p, "failed", func(st corev1.PodStatus) bool { return st.Phase == corev1.PodFailed })
	require.Equal(t, int32(4), st.ContainerStatuses[0].State.Terminated.ExitCode)
	require.Equal(t, int32(0), st.InitContainerStatuses[0].State.Terminated.ExitCode)
	require.True(t, strings.HasPrefix(st.ContainerStatuses[0].ContainerID, "containerd://"))
}
