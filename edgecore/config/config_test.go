package config

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/configfile"
)

func write(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "edgecore.yaml")
	require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
	return p
}

// The file `edgecore config default` prints loads back to the defaults.
// They are not valid alone: tunnel.cloud and node.name have no default.
func TestDefaultFileRoundTrip(t *testing.T) {
	got, err := Load(write(t, string(DefaultFile())))
	require.NoError(t, err)
	require.Equal(t, Default(), got)
	err = got.Validate()
	require.EqualError(t, err, "tunnel.cloud: required (flag --cloud)\nnode.name: required (flag --node)")
	got.Tunnel.Cloud, got.Node.Name = []string{"cloud.example.com:10000"}, "edge-1"
	require.NoError(t, got.Validate())
}

// A whole file with every group read into its fields.
func TestFile(t *testing.T) {
	got, err := Load(write(t, head+`tunnel:
  cloud: [quic://a.example.com:10000, wss://b.example.com:10000]
  keepAlive: 2s
node:
  name: edge-1
  dataDir: /srv/tether
runtime:
  criListen: /run/tether/cri.sock
virtualMachines:
  enabled: true
  hugetlbfs2Mi: /dev/hugepages
resourcePool:
  enabled: true
  reservedCPUs: "0"
  sriovPools: ["net=0000:3b:00.0,0000:3b:00.1"]
operations:
  logLevel: debug
`))
	require.NoError(t, err)
	want := Default()
	want.Tunnel.Cloud = []string{"quic://a.example.com:10000", "wss://b.example.com:10000"}
	want.Tunnel.KeepAlive.Duration = 2 * time.Second
	want.Node.Name, want.Node.DataDir = "edge-1", "/srv/tether"
	want.Runtime.CRIListen = "/run/tether/cri.sock"
	want.VM.Enabled, want.VM.Hugetlbfs2Mi = true, "/dev/hugepages"
	want.ResourcePool = ResourcePool{Enabled: true, ReservedCPUs: "0", SRIOVPools: []string{"net=0000:3b:00.0,0000:3b:00.1"}}
	want.Ops.LogLevel = "debug"
	require.Equal(t, want, got)
	require.NoError(t, got.Validate())
	pools, err := got.ResourcePool.VFPools()
	require.NoError(t, err)
	require.Equal(t, map[string][]string{"net": {"0000:3b:00.0", "0000:3b:00.1"}}, pools)
}

const head = "apiVersion: config.tether.dev/v1alpha1\nkind: EdgeCoreConfiguration\n"

// required makes a file valid but for what it adds.
const required = "tunnel:\n  cloud: [cloud.example.com:10000]\nnode:\n  name: edge-1\n"

// Each bad file is refused with an error that names the field.
func TestBadFiles(t *testing.T) {
	for _, tc := range []struct {
		name, body, want string
		invalid          bool // loads, refused by Validate
	}{
		{"cloud's kind", "apiVersion: config.tether.dev/v1alpha1\nkind: CloudCoreConfiguration\n", `kind: want EdgeCoreConfiguration, got "CloudCoreConfiguration"`, false},
		{"unknown field", head + "node:\n  name: edge-1\n  token: tj1.abc\n", "node.token: unknown field", false},
		{"unknown group", head + "join:\n  token: tj1.abc\n", "join: unknown field", false},
		{"cloud not a list", head + "tunnel:\n  cloud: a:1\n", "tunnel.cloud: want a list, got a string", false},
		{"bool not a bool", head + "virtualMachines:\n  enabled: yes please\n", "virtualMachines.enabled: want true or false", false},
		{"no cloud", head + "node:\n  name: edge-1\n", "tunnel.cloud: required (flag --cloud)", true},
		{"empty cloud address", head + "tunnel:\n  cloud: [\"a:1\", \"\"]\nnode:\n  name: edge-1\n", "tunnel.cloud[1]: empty address", true},
		{"no node", head + "tunnel:\n  cloud: [a:1]\n", "node.name: required (flag --node)", true},
		{"control: valid", head + required + "  dataDir: /x\n", "", false},
		{"group given twice", head + required + "tunnel:\n  keepAlive: 1m\n", "parse YAML", false},
		{"tls files apart", head + required + "  tlsCert: /etc/edge.crt\n", "node.tlsCert: node.tlsCert, node.tlsKey and node.ca go together", true},
		{"bad accel", head + required + "virtualMachines:\n  accel: hvf\n", `virtualMachines.accel: want kvm, tcg or empty (probe), got "hvf"`, true},
		{"pool settings without pool", head + required + "resourcePool:\n  staticCPUPolicy: true\n", "resourcePool.enabled: resourcePool.reservedCPUs, reservedDataPlaneCPUs, sriovPools and staticCPUPolicy need it true", true},
		{"bad sriov pool", head + required + "resourcePool:\n  enabled: true\n  sriovPools: [net]\n", `resourcePool.sriovPools[0]: "net": want NAME=PF`, true},
		{"bad log level", head + required + "operations:\n  logLevel: trace\n", `operations.logLevel: want debug, info, warn or error, got "trace"`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Load(write(t, tc.body))
			if tc.want == "" {
				// A control: valid.
				require.NoError(t, err)
				require.NoError(t, cfg.Validate())
				return
			}
			if tc.invalid {
				require.NoError(t, err)
				err = cfg.Validate()
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// A keepalive of 0 and a dead-peer timeout not above it are named.
func TestValidateTimings(t *testing.T) {
	c := Default()
	c.Tunnel.Cloud, c.Node.Name = []string{"a:1"}, "edge-1"
	c.Tunnel.KeepAlive.Duration = 0
	require.EqualError(t, c.Validate(), "tunnel.keepAlive: must be > 0, got 0s")
	c.Tunnel.KeepAlive.Duration = time.Minute
	require.EqualError(t, c.Validate(), "tunnel.deadPeerTimeout: must be > tunnel.keepAlive (1m0s), got 15s")
}

// docs/operations.md holds the reference made from the fields' tags.
// TETHER_UPDATE_DOCS=1 rewrites it.
func TestReferenceInDocs(t *testing.T) {
	require.NoError(t, configfile.CheckSection(filepath.Join("..", "..", "docs", "operations.md"),
		"edgecore config reference", Reference(), os.Getenv("TETHER_UPDATE_DOCS") == "1"))
}
