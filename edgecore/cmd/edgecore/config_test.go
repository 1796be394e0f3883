package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/config"
)

func runEdgecore(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(t.Context())
	return out.String(), err
}

// Flags given override the file; flags not given leave it.
func TestFlagsOverrideFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edgecore.yaml")
	require.NoError(t, os.WriteFile(path, []byte("apiVersion: config.tether.dev/v1alpha1\nkind: EdgeCoreConfiguration\n"+
		"tunnel:\n  cloud: [a.example.com:10000]\n  keepAlive: 2s\nnode:\n  name: from-file\n  dataDir: /srv/tether\n"+
		"virtualMachines:\n  enabled: true\n  accel: tcg\n"), 0o600))
	cfg, err := parseConfig(t, "--config", path, "--keepalive", "3s", "--vm-hugetlbfs-1gi", "/dev/hugepages1G")
	require.NoError(t, err)
	want := config.Default()
	want.Tunnel.Cloud = []string{"127.0.0.1:1"} // parseConfig's --cloud over the file's
	want.Tunnel.KeepAlive.Duration = 3 * time.Second
	want.Node.Name = "edge-1" // parseConfig's --node
	want.Node.DataDir = "/srv/tether"
	want.VM.Enabled, want.VM.Accel, want.VM.Hugetlbfs1Gi = true, "tcg", "/dev/hugepages1G"
	require.Equal(t, want, cfg)
	require.Equal(t, &app.VMConfig{QEMU: "qemu-system-x86_64", RunDir: app.DefaultVMRunDir, Accel: "tcg",
		HugepageDirs: map[string]string{"1Gi": "/dev/hugepages1G"}}, vmConfig(cfg.VM))
}

// A bad file or flag stops edgecore before it reads its identity: the
// data directory named does not exist, which would be the error
// otherwise.
func TestBadConfigStartsNothing(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte("apiVersion: config.tether.dev/v1alpha1\nkind: EdgeCoreConfiguration\nnode:\n  nodeName: edge-1\n"), 0o600))
	base := []string{"--cloud", "127.0.0.1:1", "--node", "edge-1", "--data-dir", filepath.Join(dir, "absent"), "--metrics-addr", "0"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--config", bad}, "node.nodeName: unknown field"},
		{[]string{"--dead-peer-timeout", "1s"}, "tunnel.deadPeerTimeout: must be > tunnel.keepAlive"},
		{[]string{"--vm-accel", "hvf"}, "virtualMachines.accel"},
	} {
		_, err := runEdgecore(t, append(base, tc.args...)...)
		require.ErrorContains(t, err, tc.want)
		require.NotContains(t, err.Error(), "absent")
	}
	_, err := runEdgecore(t, "--metrics-addr", "0")
	require.ErrorContains(t, err, "tunnel.cloud: required (flag --cloud)\nnode.name: required (flag --node)")
	// The control: valid, it gets as far as the identity.
	_, err = runEdgecore(t, base...)
	require.ErrorContains(t, err, "absent")
}

// config default prints the default file; --help groups the flags; the
// subcommands keep theirs, edgecore cri the VM flags among them.
func TestConfigDefaultAndHelp(t *testing.T) {
	out, err := runEdgecore(t, "config", "default")
	require.NoError(t, err)
	require.Equal(t, string(config.DefaultFile()), out)
	out, err = runEdgecore(t, "--help")
	require.NoError(t, err)
	for _, g := range []string{"Tunnel flags:\n      --cloud", "Node flags:\n      --node", "Container runtime flags:", "Virtual machines flags:\n      --vm ",
		"Resource pool flags:\n      --resource-pool", "Operations flags:", "Other flags:\n      --config"} {
		require.Contains(t, out, g)
	}
	out, err = runEdgecore(t, "cri", "--help")
	require.NoError(t, err)
	require.Contains(t, out, "--vm-accel string")
	require.NotContains(t, out, "(file:")
	require.NotContains(t, out, "Tunnel flags:")
}
