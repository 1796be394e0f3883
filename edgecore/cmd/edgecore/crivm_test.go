package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/vmguest"
)

// TestCrictlLogsOfVM: crictl logs, which parses the CRI log format, shows
// a VM's console through the standalone shim with --vm (real QEMU, the
// test guest): the boot marker, then the guest's powerdown line after a
// graceful crictl stop. Before the console was converted, crictl logs
// failed on QEMU's raw output.
func TestCrictlLogsOfVM(t *testing.T) {
	crictl := crictlPath(t)
	h := containerd.Start(t)
	imageDir := filepath.Join(t.TempDir(), "vm-images")
	images, err := vm.OpenImages(imageDir, "")
	require.NoError(t, err)
	vmguest.Import(t, images)
	sock := startCRICommand(t, h, "--vm", "--vm-image-dir", imageDir, "--vm-run-dir", vmguest.RunDir(t),
		"--vm-accel", vmguest.Accel(t))
	dir := t.TempDir()
	podJSON, ctrJSON := filepath.Join(dir, "pod.json"), filepath.Join(dir, "ctr.json")
	require.NoError(t, os.WriteFile(podJSON, []byte(`{
  "metadata": {"name": "vm-pod", "namespace": "default", "uid": "uid-vm-pod", "attempt": 0},
  "log_directory": "`+filepath.Join(dir, "logs")+`",
  "annotations": {"`+vm.AnnotationName+`": "web", "`+vm.AnnotationVCPUs+`": "1", "`+vm.AnnotationMemory+`": "128Mi"}
}`), 0o600))
	require.NoError(t, os.WriteFile(ctrJSON, []byte(`{
  "metadata": {"name": "guest"},
  "image": {"image": "`+vmguest.ImageName+`"},
  "log_path": "guest_0.log"
}`), 0o600))
	base := []string{"--runtime-endpoint", "unix://" + sock, "--image-endpoint", "unix://" + sock, "--timeout", "90s"}
	run := func(args ...string) string {
		t.Helper()
		var stderr strings.Builder
		cmd := exec.Command(crictl, append(base, args...)...)
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		require.NoError(t, err, "crictl %s: %s%s", strings.Join(args, " "), out, stderr.String())
		return strings.TrimSpace(string(out))
	}
	logs := func(id string) (string, error) {
		out, err := exec.Command(crictl, append(base, "logs", id)...).CombinedOutput()
		return string(out), err
	}
	podID := run("runp", "--runtime", "tether-vm", podJSON)
	ctrID := run("create", "--no-pull", podID, ctrJSON, podJSON)
	run("start", ctrID)
	require.Eventually(t, func() bool {
		out, err := logs(ctrID)
		return err == nil && strings.Contains(out, vm.BootMarker)
	},
		4*time.Minute, 100*time.Millisecond, "crictl logs shows the boot marker")
	run("stop", "--timeout", "60", ctrID)
	out, err := logs(ctrID)
	require.NoError(t, err, "crictl logs: %s", out)
	require.Equal(t, 1, strings.Count(out, vm.BootMarker), "%s", out)
	require.Contains(t, out, "TETHER-GUEST-POWERDOWN")
	require.NotContains(t, out, "\r", "the guest's line ends are taken off")
	run("rm", ctrID)
	run("stopp", podID)
	run("rmp", podID)
}
