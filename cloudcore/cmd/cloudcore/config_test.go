package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/cloudcore/config"
)

// run runs the cloudcore command with args and returns its output.
func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(t.Context())
	return out.String(), err
}

// Flags given on the command line override the file; flags not given do
// not, even where the file sets their field to something else than the
// flag's default.
func TestFlagsOverrideFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cloudcore.yaml")
	require.NoError(t, os.WriteFile(path, []byte("apiVersion: config.tether.dev/v1alpha1\nkind: CloudCoreConfiguration\n"+
		"tunnel:\n  keepAlive: 2s\n  deadPeerTimeout: 9s\noperations:\n  logLevel: warn\nonboarding:\n  serverSANs: [a.example.com]\n"), 0o600))
	var cfg config.CloudCoreConfiguration
	root := newCommand(func(_ context.Context, c config.CloudCoreConfiguration) error { cfg = c; return nil })
	root.SetArgs([]string{"--config", path, "--keepalive", "3s", "--server-san", "b.example.com", "--vm-controller=false"})
	require.NoError(t, root.ExecuteContext(t.Context()))
	want := config.Default()
	want.Tunnel.KeepAlive.Duration = 3 * time.Second       // flag over file
	want.Tunnel.DeadPeerTimeout.Duration = 9 * time.Second // file
	want.Ops.LogLevel = "warn"                             // file
	want.Onboarding.ServerSANs = []string{"b.example.com"} // flag over file, replaced not appended
	want.VM.Controller = false                             // flag over default
	require.Equal(t, want, cfg)
	a := appConfig(cfg, nil, nil, nil)
	require.Equal(t, 3*time.Second, a.KeepAlive)
	require.Equal(t, 9*time.Second, a.DeadPeerTimeout)
	require.True(t, a.VMs.Disabled)
}

// A bad file, or a flag that makes the configuration invalid, stops
// cloudcore before it starts anything: the error names the field, and it
// never reaches the API server (the kubeconfig named does not exist,
// which would be the error otherwise).
func TestBadConfigStartsNothing(t *testing.T) {
	dir := t.TempDir()
	missingKube := filepath.Join(dir, "no-kubeconfig")
	bad := filepath.Join(dir, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte("apiVersion: config.tether.dev/v1alpha1\nkind: CloudCoreConfiguration\ntunnel:\n  keepAliv: 5s\n"), 0o600))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--config", bad}, "tunnel.keepAliv: unknown field"},
		{[]string{"--keepalive", "0s"}, "tunnel.keepAlive: must be > 0"},
		{[]string{"--config", filepath.Join(dir, "absent.yaml")}, "open config file " + filepath.Join(dir, "absent.yaml") + ": no such file or directory"},
	} {
		_, err := run(t, append(tc.args, "--kubeconfig", missingKube, "--metrics-addr", "0")...)
		require.ErrorContains(t, err, tc.want)
		require.NotContains(t, err.Error(), "kubernetes client config")
	}
	// The control: with a valid configuration it gets as far as the
	// kubeconfig.
	_, err := run(t, "--kubeconfig", missingKube, "--metrics-addr", "0")
	require.ErrorContains(t, err, "kubernetes client config")
}

// config default prints the file that loads to the defaults; --help lists
// the flags by group with the field each sets.
func TestConfigDefaultAndHelp(t *testing.T) {
	out, err := run(t, "config", "default")
	require.NoError(t, err)
	require.Equal(t, string(config.DefaultFile()), out)
	out, err = run(t, "--help")
	require.NoError(t, err)
	require.Contains(t, out, "Tunnel flags:\n      --quic-addr")
	require.Contains(t, out, "(file: tunnel.keepAlive)")
	require.Contains(t, out, "Other flags:\n      --config")
	out, err = run(t, "admin", "--help")
	require.NoError(t, err)
	require.Contains(t, out, "Available Commands:")
	require.NotContains(t, out, "Tunnel flags:")
}
