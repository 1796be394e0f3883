package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	sock := startCRICommand(t, h)
	ctx := klog.NewContext(t.Context(), logr.Discard())
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

// startCRICommand runs `edgecore cri` as an operator would, in front of
// h (with extra flags), until the test ends, and returns its socket.
func startCRICommand(t *testing.T, h *containerd.Host, extra ...string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tether-cri-cmd-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "cri.sock")
	ctx, cancel := context.WithCancel(klog.NewContext(context.Background(), logr.Discard()))
	root := newRootCommand()
	root.SetArgs(append([]string{"cri", "--listen", sock, "--containerd", h.Endpoint(), "--state", filepath.Join(t.TempDir(), "state.db"), "--log-level", "error"}, extra...))
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
	return sock
}

// crictlPath is crictl as `make tools` installs it (TETHER_CRICTL
// overrides). The test fails, never skips, without it.
func crictlPath(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("TETHER_CRICTL"); p != "" {
		return p
	}
	p, err := filepath.Abs(filepath.Join("..", "..", "..", "_output", "tools", "bin", "crictl-v1.37.0"))
	require.NoError(t, err)
	_, err = os.Stat(p)
	require.NoError(t, err, "crictl is missing: run `make tools` (or set TETHER_CRICTL)")
	return p
}

// TestCRICommandWithCrictl drives the standalone shim with crictl, the
// CLI operators use: runp, create, start, ps, inspect, exec, logs, stop, rm.
func TestCRICommandWithCrictl(t *testing.T) {
	crictl := crictlPath(t)
	h := containerd.Start(t)
	sock := startCRICommand(t, h)
	dir := t.TempDir()
	podJSON := filepath.Join(dir, "pod.json")
	ctrJSON := filepath.Join(dir, "ctr.json")
	require.NoError(t, os.WriteFile(podJSON, []byte(`{
  "metadata": {"name": "crictl-pod", "namespace": "default", "uid": "uid-crictl", "attempt": 0},
  "log_directory": "`+h.PodLogDir("crictl-pod")+`",
  "linux": {"security_context": {"namespace_options": {"network": 2}}}
}`), 0o600))
	require.NoError(t, os.WriteFile(ctrJSON, []byte(`{
  "metadata": {"name": "crictl-ctr"},
  "image": {"image": "`+h.BusyboxImage+`"},
  "command": ["sh", "-c", "echo hello crictl; exec sleep 3600"],
  "log_path": "crictl-ctr.log"
}`), 0o600))
	run := func(args ...string) string {
		t.Helper()
		all := append([]string{"--runtime-endpoint", "unix://" + sock, "--image-endpoint", "unix://" + sock, "--timeout", "60s"}, args...)
		var stderr strings.Builder
		cmd := exec.Command(crictl, all...)
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		require.NoError(t, err, "crictl %s: %s%s", strings.Join(args, " "), out, stderr.String())
		return strings.TrimSpace(string(out))
	}
	podID := run("runp", podJSON)
	ctrID := run("create", podID, ctrJSON, podJSON)
	run("start", ctrID)
	require.Contains(t, run("ps", "-q"), ctrID)
	require.Contains(t, run("pods", "-q"), podID)
	require.Contains(t, run("inspect", ctrID), `"state": "CONTAINER_RUNNING"`)
	require.Equal(t, "in the pod", run("exec", ctrID, "echo", "in the pod"))
	require.Eventually(t, func() bool {
		out, err := exec.Command(crictl, "--runtime-endpoint", "unix://"+sock, "logs", ctrID).CombinedOutput()
		return err == nil && strings.Contains(string(out), "hello crictl")
	}, 10*time.Second, 50*time.Millisecond)
	run("stop", "--timeout", "0", ctrID)
	run("rm", ctrID)
	run("stopp", podID)
	run("rmp", podID)
	require.Empty(t, run("pods", "-q"))
}
