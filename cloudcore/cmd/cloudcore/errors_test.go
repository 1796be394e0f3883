package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/tests/controlplane"
)

// Without a kubeconfig, outside a pod, the daemon and the admin commands
// say what to give, not client-go's hint at KUBERNETES_MASTER.
func TestNoKubeconfigSaysWhatToGive(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "absent"))
	_, err := run(t, "--metrics-addr", "0")
	require.ErrorContains(t, err, "no kubeconfig given and not in a pod")
	require.ErrorContains(t, err, "give --kubeconfig FILE")
	require.NotContains(t, err.Error(), "KUBERNETES_MASTER")
	_, err = run(t, "admin", "list")
	require.ErrorContains(t, err, "give --kubeconfig FILE or set KUBECONFIG")
	require.NotContains(t, err.Error(), "KUBERNETES_MASTER")
}

// An admin command given no node, or two, says it wants one and how.
func TestAdminNodeArgument(t *testing.T) {
	for _, verb := range []string{"allow", "disable", "remove"} {
		_, err := run(t, "admin", verb)
		require.EqualError(t, err, "give one node name: cloudcore admin "+verb+" NODE, got 0 arguments")
		_, err = run(t, "admin", verb, "a", "b")
		require.EqualError(t, err, "give one node name: cloudcore admin "+verb+" NODE, got 2 arguments")
	}
}

// admin allow prints the token alone on stdout, and on stderr how to join
// with it from a file: the token never on a command line, where ps shows
// it.
func TestAdminAllowHintKeepsTokenOffCommandLine(t *testing.T) {
	env := controlplane.Start(t)
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(kc, env.KubeConfig, 0o600))
	root := newRootCommand()
	var stdout, stderr bytes.Buffer
	root.SetOut(&stdout)
	root.SetErr(&stderr)
	root.SetArgs([]string{"admin", "allow", "edge-hint", "--kubeconfig", kc, "--cloud", "cloud.example.com:10002"})
	require.NoError(t, root.ExecuteContext(t.Context()))
	token := strings.TrimSpace(stdout.String())
	require.True(t, strings.HasPrefix(token, "tj1."), "stdout is the token: %q", token)
	require.Contains(t, stderr.String(), "edgecore join --cloud cloud.example.com:10002 --token-file /root/tether.token --node edge-hint\n")
	require.NotContains(t, stderr.String(), token, "the hint never puts the token on a command line")
}
