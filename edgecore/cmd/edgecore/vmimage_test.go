package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func vmImage(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"vm-image"}, args...))
	err := root.ExecuteContext(t.Context())
	return out.String(), err
}

// TestVMImageCommand imports, lists and removes a real qcow2 image with
// edgecore vm-image, and refuses bad input.
func TestVMImageCommand(t *testing.T) {
	src := t.TempDir()
	disk := filepath.Join(src, "disk.qcow2")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "32M").CombinedOutput()
	require.NoError(t, err, "%s", out)
	kernel := filepath.Join(src, "vmlinuz")
	require.NoError(t, os.WriteFile(kernel, []byte("kernel"), 0o644))
	store := filepath.Join(t.TempDir(), "images")

	got, err := vmImage(t, "import", "guest", disk, "--image-dir", store, "--kernel", kernel, "--cmdline", "console=ttyS0")
	require.NoError(t, err)
	require.Regexp(t, `^guest sha256:[0-9a-f]{64} qcow2 33554432\n$`, got)
	got, err = vmImage(t, "list", "--image-dir", store)
	require.NoError(t, err)
	require.Contains(t, got, "NAME")
	require.Regexp(t, `guest\s+sha256:[0-9a-f]{64}\s+qcow2\s+33554432\s+yes`, got)

	_, err = vmImage(t, "import", "Bad/Name", disk, "--image-dir", store)
	require.ErrorContains(t, err, "use lowercase letters")
	_, err = vmImage(t, "import", "other", filepath.Join(src, "missing"), "--image-dir", store)
	require.ErrorContains(t, err, "no such file")
	_, err = vmImage(t, "import", "guest", disk, "--image-dir", store)
	require.ErrorContains(t, err, "already imported")

	_, err = vmImage(t, "remove", "guest", "--image-dir", store)
	require.NoError(t, err)
	got, err = vmImage(t, "list", "--image-dir", store)
	require.NoError(t, err)
	require.NotContains(t, got, "guest")
	_, err = vmImage(t, "remove", "guest", "--image-dir", store)
	require.ErrorContains(t, err, "image not found")
}
