package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/cloudcore/onboard"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
)

// TestJoinCommandTokenSources runs the real `edgecore join` binary against
// the real CloudCore and API server with the token in a file or in the
// environment, never in its arguments: a group-readable file is refused
// (naming its mode) before the token is used, the file is removed after
// the join unless --keep-token-file, and the joined identity connects.
func TestJoinCommandTokenSources(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	c := startCloud(t, env.Config, cloudOptions{timings: testTimings})
	bin := filepath.Join(t.TempDir(), "edgecore")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/tetheredge/tether/edgecore/cmd/edgecore").CombinedOutput()
	require.NoError(t, err, "go build edgecore: %s", out)

	allow := func(node string) string {
		t.Cleanup(func() {
			_ = c.app.EdgeNodes().Delete(context.Background(), node)
			_ = cs.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{})
		})
		tok, _, err := onboard.Allow(context.Background(), c.app.EdgeNodes(), c.app.CA().Cert, node, onboard.AllowOptions{})
		require.NoError(t, err)
		return tok.String()
	}
	// join runs `edgecore join` for node into dir with extra arguments and
	// environment; the token must never be among its arguments.
	join := func(token, node, dir string, environ []string, args ...string) (string, error) {
		argv := append([]string{"join", "--cloud", c.app.JoinAddr().String(), "--node", node, "--data-dir", dir}, args...)
		require.False(t, slices.Contains(argv, token))
		cmd := exec.Command(bin, argv...)
		cmd.Env = append(os.Environ(), environ...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	writeFile := func(token string, mode os.FileMode) string {
		p := filepath.Join(t.TempDir(), "token")
		require.NoError(t, os.WriteFile(p, []byte(token+"\n"), 0o600))
		require.NoError(t, os.Chmod(p, mode))
		return p
	}

	t.Run("file", func(t *testing.T) {
		const node = "edge-token-file"
		token, dir := allow(node), t.TempDir()
		file := writeFile(token, 0o644)
		out, err := join(token, node, dir, nil, "--token-file", file)
		require.Error(t, err, out)
		require.Contains(t, out, "has mode 0644")
		require.FileExists(t, file, "a refused file is left for the operator to fix")
		_, _, _, err = edgejoin.Load(dir)
		require.Error(t, err, "nothing is stored by a refused join")

		require.NoError(t, os.Chmod(file, 0o600))
		out, err = join(token, node, dir, nil, "--token-file", file)
		require.NoError(t, err, out)
		require.Contains(t, out, "removed token file "+file)
		require.NoFileExists(t, file)
		startJoinedEdge(t, c, node, dir)
		require.Eventually(t, func() bool { return connected(c, node) }, time.Minute, 20*time.Millisecond)
	})
	t.Run("kept file", func(t *testing.T) {
		const node = "edge-token-kept"
		token, dir := allow(node), t.TempDir()
		file := writeFile(token, 0o400)
		out, err := join(token, node, dir, nil, "--token-file", file, "--keep-token-file")
		require.NoError(t, err, out)
		require.FileExists(t, file)
		_, _, leaf, err := edgejoin.Load(dir)
		require.NoError(t, err)
		require.Equal(t, node, leaf.Subject.CommonName)
	})
	t.Run("environment", func(t *testing.T) {
		const node = "edge-token-env"
		token, dir := allow(node), t.TempDir()
		file := writeFile(token, 0o600)
		out, err := join(token, node, dir, []string{"TETHER_JOIN_TOKEN=" + token}, "--token-file", file)
		require.Error(t, err, out)
		require.Contains(t, out, "the join token is given --token-file and TETHER_JOIN_TOKEN")
		require.FileExists(t, file)

		out, err = join(token, node, dir, []string{"TETHER_JOIN_TOKEN=" + token})
		require.NoError(t, err, out)
		_, _, leaf, err := edgejoin.Load(dir)
		require.NoError(t, err)
		require.Equal(t, node, leaf.Subject.CommonName)
	})
}
