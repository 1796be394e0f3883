// Package deploy holds Tether's deployment manifests (RBAC, the EdgeCore
// systemd unit, the Grafana dashboard) and the test of what can be
// checked of them without a cluster: the systemd unit. The manifests that
// need an API server or both daemons are tested in tests/e2e
// (TestRBACLeastPrivilege, TestOpsReference). It has no Go code of its
// own.
package deploy

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	edgejoin "github.com/tetheredge/tether/edgecore/join"
)

// installedBinary is where edgecore.service expects the binary.
const installedBinary = "/usr/local/bin/edgecore"

// TestSystemdUnit: systemd-analyze verify accepts edgecore.service (with
// the binary it names built from this tree), with no warning about it;
// the keys the unit's promises rest on are there; and the flags of its
// ExecStart and ExecStartPre are flags the edgecore command accepts.
func TestSystemdUnit(t *testing.T) {
	unit, err := os.ReadFile("edgecore.service")
	require.NoError(t, err)
	bin := filepath.Join(t.TempDir(), "edgecore")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/tetheredge/tether/edgecore/cmd/edgecore").CombinedOutput()
	require.NoError(t, err, "go build edgecore: %s", out)

	t.Run("systemd-analyze verify", func(t *testing.T) {
		analyze, err := exec.LookPath("systemd-analyze")
		require.NoError(t, err, "systemd-analyze comes with Debian's systemd package (make runtime-deps installs it)")
		dir := t.TempDir()
		path := filepath.Join(dir, "edgecore.service")
		require.NoError(t, os.WriteFile(path, bytes.ReplaceAll(unit, []byte(installedBinary), []byte(bin)), 0o644))
		out, err := exec.Command(analyze, "verify", "--man=no", path).CombinedOutput()
		require.NoError(t, err, "systemd-analyze verify: %s", out)
		for line := range strings.SplitSeq(string(out), "\n") {
			// Warnings about other units of the host are not this test's.
			require.NotContains(t, line, "edgecore.service", "systemd-analyze verify warns: %s", out)
		}
	})

	u := parseUnit(t, unit)
	for _, kv := range [][2]string{
		{"Unit.Wants", "containerd.service"},
		{"Unit.After", "containerd.service"},
		{"Unit.StartLimitIntervalSec", "0"},
		{"Service.StateDirectory", "tether/edgecore"},
		{"Service.StateDirectoryMode", "0700"},
		{"Service.RuntimeDirectory", "tether"},
		{"Service.RuntimeDirectoryPreserve", "yes"},
		{"Service.Restart", "always"},
		{"Service.RestartSec", "5s"},
		{"Service.KillMode", "process"},
		{"Service.LimitNOFILE", "1048576"},
		{"Install.WantedBy", "multi-user.target"},
	} {
		require.True(t, slices.ContainsFunc(u[kv[0]], func(v string) bool { return slices.Contains(strings.Fields(v), kv[1]) }),
			"%s has %s (it has %q)", kv[0], kv[1], u[kv[0]])
	}

	// The data directory is the state directory, and the join is skipped
	// once the identity edgecore join stores is there.
	require.Len(t, u["Service.ExecStart"], 1)
	require.Len(t, u["Service.ExecStartPre"], 1)
	start, pre := u["Service.ExecStart"][0], u["Service.ExecStartPre"][0]
	require.Contains(t, start, "--data-dir /var/lib/tether/edgecore ")
	require.Contains(t, pre, "test -s /var/lib/tether/edgecore/"+edgejoin.IdentityFile+" ||")
	require.Contains(t, pre, "--token-file /etc/tether/join-token")
	require.NotContains(t, pre, "--token ", "the token is never on a command line")
	require.Contains(t, start, "--cri-listen /run/tether/cri.sock", "the CRI socket is in the runtime directory")

	// Every flag of the two command lines is one edgecore accepts: cobra
	// refuses an unknown flag before it looks at --help.
	expand := strings.NewReplacer("${TETHER_NODE}", "edge-1", "${TETHER_CLOUD}", "cloud:10000", "$EDGECORE_ARGS", "",
		`"$TETHER_JOIN_ADDR"`, "cloud:10002", `"$TETHER_NODE"`, "edge-1")
	joinCmd := pre[strings.Index(pre, "exec ")+len("exec ") : strings.LastIndex(pre, "'")]
	for _, cmdline := range []string{start, joinCmd} {
		args := strings.Fields(expand.Replace(cmdline))
		require.Equal(t, installedBinary, args[0])
		out, err := exec.Command(bin, append(args[1:], "--help")...).CombinedOutput()
		require.NoError(t, err, "edgecore %v: %s", args[1:], out)
	}
}

// parseUnit reads a systemd unit file into "Section.Key" -> values, one
// per assignment, with continuation lines joined.
func parseUnit(t *testing.T, b []byte) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	var pending string
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if pending != "" {
			line, pending = pending+" "+line, ""
		}
		if strings.HasSuffix(line, `\`) {
			pending = strings.TrimSuffix(line, `\`)
			continue
		}
		switch {
		case line == "", strings.HasPrefix(line, "#"), strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
		default:
			k, v, ok := strings.Cut(line, "=")
			require.True(t, ok, "not a key=value line: %q", line)
			require.NotEmpty(t, section, "%q is outside a section", line)
			out[section+"."+strings.TrimSpace(k)] = append(out[section+"."+strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	require.NoError(t, sc.Err())
	return out
}
