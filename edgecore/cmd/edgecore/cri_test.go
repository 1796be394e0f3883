package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	remote "k8s.io/cri-client/pkg"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/tests/containerd"
)

// TestCRICommand runs `edgecore cri` as an operator would and drives it
// with the CRI client: a busybox pod from runp to rm, and the VM handler
// refused.
func TestCRICommand(t *testing.T) {
	h := containerd.Start(t)
	dir, err := os.MkdirTemp("", "tether-cri-cmd-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "cri.sock")

	ctx, cancel := context.WithCancel(klog.NewContext(context.Background(), logr.Discard()))
	root := newRootCommand()
	root.SetArgs([]string{"cri", "--listen", sock, "--containerd", h.Endpoint(), "--state", filepath.Join(t.TempDir(), "state.db"), "--log-level", "error"})
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	require.Eventually(t, func() bool {
		c, err := net.Dial("unix", sock)
		if err == nil {
			_ = c.Close()
		}
		return err == nil
	}, 10*time.Second, 10*time.Millisecond)

	rt, err := remote.NewRemoteRuntimeService(ctx, "unix://"+sock, time.Minute, nil, false)
	require.NoError(t, err)
	t.Cleanup(func() { _ = rt.Close(ctx) })

	sb := h.PodSandboxConfig("cmd", true)
	_, err = rt.RunPodSandbox(ctx, sb, "tether-vm")
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "%v", err)
	podID, err := rt.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	ctrID, err := rt.CreateContainer(ctx, podID, h.BusyboxContainer("cmd", "sleep", "3600"), sb)
	require.NoError(t, err)
	require.NoError(t, rt.StartContainer(ctx, ctrID))
	ctrs, err := rt.ListContainers(ctx, &runtimeapi.ContainerFilter{State: &runtimeapi.ContainerStateValue{State: runtimeapi.ContainerState_CONTAINER_RUNNING}})
	require.NoError(t, err)
	require.Len(t, ctrs, 1)
	out, _, err := rt.ExecSync(ctx, ctrID, []string{"echo", "standalone"}, 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, "standalone\n", string(out))
	require.NoError(t, rt.StopContainer(ctx, ctrID, 0))
	require.NoError(t, rt.RemoveContainer(ctx, ctrID))
	require.NoError(t, rt.StopPodSandbox(ctx, podID))
	require.NoError(t, rt.RemovePodSandbox(ctx, podID))
}
