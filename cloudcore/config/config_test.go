package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/configfile"
)

func write(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cloudcore.yaml")
	require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
	return p
}

// The file `cloudcore config default` prints loads back to the defaults,
// and they are valid.
func TestDefaultFileRoundTrip(t *testing.T) {
	got, err := Load(write(t, string(DefaultFile())))
	require.NoError(t, err)
	require.Equal(t, Default(), got)
	require.NoError(t, got.Validate())
	// Not the defaults by accident: a field the file sets is read.
	got, err = Load(write(t, strings.Replace(string(DefaultFile()), `keepAlive: "5s"`, `keepAlive: "7s"`, 1)))
	require.NoError(t, err)
	require.Equal(t, 7*time.Second, got.Tunnel.KeepAlive.Duration)
}

// The default file holds nothing of the machine that wrote it: it is
// written on one machine for another, whose own host name the empty
// serverSANs stands for when that one starts.
func TestDefaultFileIsPortable(t *testing.T) {
	host, err := os.Hostname()
	require.NoError(t, err)
	require.NotEmpty(t, host)
	written, err := Load(write(t, string(DefaultFile())))
	require.NoError(t, err)
	require.NotContains(t, written.Onboarding.ServerSANs, host)
	require.Empty(t, written.Onboarding.ServerSANs)
	require.Contains(t, string(DefaultFile()), "\n  serverSANs: []\n")

	other := func() (string, error) { return "cloud-b", nil }
	require.Equal(t, []string{"cloud-b", "localhost", "127.0.0.1"}, Default().Onboarding.SANs(other), "resolved where CloudCore starts")
	require.Equal(t, []string{host, "localhost", "127.0.0.1"}, Default().Onboarding.SANs(nil))
	noName := func() (string, error) { return "", errors.New("no host name") }
	require.Equal(t, []string{"localhost", "127.0.0.1"}, Default().Onboarding.SANs(noName))
	set := Onboarding{ServerSANs: []string{"cloud.example.com"}}
	require.Equal(t, []string{"cloud.example.com"}, set.SANs(other), "a list set is used as it is")
}

// A file names only what it changes; the rest keeps its default.
func TestPartialFile(t *testing.T) {
	got, err := Load(write(t, "apiVersion: config.tether.dev/v1alpha1\nkind: CloudCoreConfiguration\n"+
		"tunnel:\n  deadPeerTimeout: 1m\nonboarding:\n  serverSANs: [cloud.example.com]\nedges:\n  registerTaintKeys: [dedicated]\n"))
	require.NoError(t, err)
	want := Default()
	want.Tunnel.DeadPeerTimeout.Duration = time.Minute
	want.Onboarding.ServerSANs = []string{"cloud.example.com"}
	want.Edges.RegisterTaintKeys = []string{"dedicated"}
	require.Equal(t, want, got)
}

// Each bad file is refused with an error that names the field.
func TestBadFiles(t *testing.T) {
	const head = "apiVersion: config.tether.dev/v1alpha1\nkind: CloudCoreConfiguration\n"
	for _, tc := range []struct {
		name, body, want string
		invalid          bool // loads, refused by Validate
	}{
		{"no apiVersion", "kind: CloudCoreConfiguration\n", "apiVersion: want config.tether.dev/v1alpha1", false},
		{"other apiVersion", "apiVersion: config.tether.dev/v1\nkind: CloudCoreConfiguration\n", `apiVersion: want config.tether.dev/v1alpha1, got "config.tether.dev/v1"`, false},
		{"other kind", "apiVersion: config.tether.dev/v1alpha1\nkind: EdgeCoreConfiguration\n", `kind: want CloudCoreConfiguration, got "EdgeCoreConfiguration"`, false},
		{"not a mapping", "- a\n", "want a YAML mapping", false},
		{"bad YAML", head + "tunnel: [\n", "parse YAML", false},
		{"duplicate key", head + "tunnel:\n  keepAlive: 1s\n  keepAlive: 2s\n", "parse YAML", false},
		{"unknown top field", head + "tunnels: {}\n", "tunnels: unknown field", false},
		{"unknown nested field", head + "tunnel:\n  keepAliv: 5s\n", "tunnel.keepAliv: unknown field", false},
		{"group not a mapping", head + "tunnel: 5\n", "tunnel: want a mapping", false},
		{"duration not a string", head + "tunnel:\n  keepAlive: 5\n", `tunnel.keepAlive: want a duration string such as "15s"`, false},
		{"bad duration", head + "tunnel:\n  keepAlive: 5 seconds\n", `tunnel.keepAlive: want a duration such as "15s"`, false},
		{"number not a number", head + "kubernetes:\n  burst: many\n", "kubernetes.burst: want an integer, got a string", false},
		{"list not a list", head + "onboarding:\n  serverSANs: cloud.example.com\n", "onboarding.serverSANs: want a list, got a string", false},
		{"bool not a bool", head + "virtualMachines:\n  controller: maybe\n", "virtualMachines.controller: want true or false, got a string", false},
		{"keepAlive 0", head + "tunnel:\n  keepAlive: 0s\n", "tunnel.keepAlive: must be > 0", true},
		{"dead peer not above keepalive", head + "tunnel:\n  keepAlive: 20s\n", "tunnel.deadPeerTimeout: must be > tunnel.keepAlive", true},
		{"no transport", head + "tunnel:\n  quicAddr: \"\"\n  webSocketAddr: \"\"\n", "tunnel.quicAddr: tunnel.quicAddr and tunnel.webSocketAddr are both empty", true},
		{"bad address", head + "onboarding:\n  joinAddr: cloud\n", `onboarding.joinAddr: want host:port or :port, got "cloud"`, true},
		{"empty SAN", head + "onboarding:\n  serverSANs: [cloud.example.com, \"\"]\n", "onboarding.serverSANs: an empty name", true},
		{"qps 0", head + "kubernetes:\n  qps: 0\n", "kubernetes.qps: must be > 0", true},
		{"negative autonomy", head + "edges:\n  offlineAutonomy: -1s\n", "edges.offlineAutonomy: must be >= 0", true},
		{"bad log level", head + "operations:\n  logLevel: loud\n", `operations.logLevel: want debug, info, warn or error, got "loud"`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Load(write(t, tc.body))
			if tc.invalid {
				require.NoError(t, err)
				err = cfg.Validate()
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// Several invalid fields are all named, in field order.
func TestValidateNamesEveryField(t *testing.T) {
	c := Default()
	c.Tunnel.KeepAlive.Duration = 0
	c.Kubernetes.Burst = -1
	err := c.Validate()
	require.Error(t, err)
	require.Equal(t, "tunnel.keepAlive: must be > 0, got 0s\nkubernetes.burst: must be > 0, got -1", err.Error())
}

// docs/operations.md holds the reference made from the fields' tags.
// TETHER_UPDATE_DOCS=1 rewrites it.
func TestReferenceInDocs(t *testing.T) {
	require.NoError(t, configfile.CheckSection(filepath.Join("..", "..", "docs", "operations.md"),
		"cloudcore config reference", Reference(), os.Getenv("TETHER_UPDATE_DOCS") == "1"))
}
