package e2e

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/serve"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/promtest"
)

// TestOpsReference checks the operator's references against what the
// daemons really register: CloudCore with every component (the VM
// controller, WebSocket and QUIC) and EdgeCore with every component (the
// in-process CRI shim in front of a real containerd, its VM backend, the
// pod manager, the resource pool), each built in this process as the
// commands build them. The metrics reference of docs/operations.md must
// list exactly their metrics, each with its type, labels and daemon; the
// Grafana dashboard of build/deploy may only query metrics (and labels)
// that exist.
func TestOpsReference(t *testing.T) {
	cloud, edge := daemonMetrics(t)

	t.Run("metrics reference", func(t *testing.T) {
		docs := documentedMetrics(t)
		registered := map[string]docMetric{}
		for daemon, ms := range map[string][]promtest.Metric{"cloudcore": cloud, "edgecore": edge} {
			for _, m := range ms {
				d, ok := registered[m.Name]
				if ok && (d.typ != m.Type || !slices.Equal(d.labels, m.Labels)) {
					t.Errorf("%s is registered by both daemons with different types or labels", m.Name)
				}
				d.typ, d.labels = m.Type, m.Labels
				d.daemons = append(d.daemons, daemon)
				slices.Sort(d.daemons)
				registered[m.Name] = d
			}
		}
		for name, r := range registered {
			d, ok := docs[name]
			if !ok {
				t.Errorf("%s (%s, labels %v, %v) is registered but not in docs/operations.md's metrics reference", name, r.typ, r.labels, r.daemons)
				continue
			}
			if d.typ != r.typ || !slices.Equal(d.labels, r.labels) || !slices.Equal(d.daemons, r.daemons) {
				t.Errorf("%s is documented as %s, labels %v, %v; it is %s, labels %v, %v", name, d.typ, d.labels, d.daemons, r.typ, r.labels, r.daemons)
			}
		}
		for name := range docs {
			if _, ok := registered[name]; !ok {
				t.Errorf("%s is documented in docs/operations.md but neither daemon registers it", name)
			}
		}
	})

	t.Run("grafana dashboard", func(t *testing.T) {
		known := map[string][]string{}
		for _, m := range slices.Concat(cloud, edge) {
			known[m.Name] = m.Labels
			if m.Type == "histogram" || m.Type == "summary" {
				for _, s := range []string{"_bucket", "_sum", "_count"} {
					known[m.Name+s] = append(slices.Clone(m.Labels), "le", "quantile")
				}
			}
		}
		// What the commands add: the Go runtime's and the process's
		// collectors (common/serve.NewRegistry).
		reg, err := serve.NewRegistry()
		require.NoError(t, err)
		mfs, err := reg.Gather()
		require.NoError(t, err)
		for _, mf := range mfs {
			known[mf.GetName()] = nil
		}
		exprs := dashboardExprs(t)
		require.NotEmpty(t, exprs)
		for _, e := range exprs {
			for _, m := range metricRE.FindAllStringSubmatch(e.expr, -1) {
				labels, ok := known[m[1]]
				if !ok {
					t.Errorf("panel %q queries %s, which neither daemon serves: %s", e.panel, m[1], e.expr)
					continue
				}
				for _, l := range matcherRE.FindAllStringSubmatch(m[2], -1) {
					if !slices.Contains(labels, l[1]) && l[1] != "job" && l[1] != "instance" {
						t.Errorf("panel %q matches label %s of %s, which has %v: %s", e.panel, l[1], m[1], labels, e.expr)
					}
				}
			}
		}
	})
}

var (
	// metricRE finds a metric name in PromQL, with its label matchers.
	metricRE = regexp.MustCompile(`\b((?:tether|go|process)_[a-zA-Z0-9_]+)(\{[^}]*\})?`)
	// matcherRE finds the label names of matchers.
	matcherRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
)

// daemonMetrics builds CloudCore and EdgeCore with every component and
// returns the metrics each registered.
func daemonMetrics(t *testing.T) (cloud, edge []promtest.Metric) {
	t.Helper()
	env := cp.Env(t)
	h := containerd.Start(t)
	c := startCloud(t, env.Config, cloudOptions{webSocket: true, vms: true, rebalance: true, timings: testTimings})
	node := uniqueNode("edge-metrics")
	id := c.admit(t, node)
	runDir, err := os.MkdirTemp("", "tvm-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(runDir) })
	e := startEdge(t, id, dataDir(t, node), c.addr, edgeOptions{timings: testTimings, runtime: h, configure: func(cfg *edgeapp.Config) {
		cfg.CRI.VM = &edgeapp.VMConfig{RunDir: runDir, Accel: "tcg"}
		cfg.Resources = &resources.Config{}
	}})
	// The pod manager is built once the in-process shim answers.
	require.Eventually(t, func() bool {
		return slices.ContainsFunc(e.reg.Metrics(), func(m promtest.Metric) bool { return m.Name == "tether_pods_syncs_total" })
	}, time.Minute, 20*time.Millisecond, "EdgeCore's pod manager registers its metrics")
	return c.reg.Metrics(), e.reg.Metrics()
}

// docMetric is one row of the metrics reference.
type docMetric struct {
	typ     string
	labels  []string
	daemons []string
}

// documentedMetrics reads the table of docs/operations.md's "Metrics
// reference" section: | `name` | type | `label`, ... or — | daemon | meaning |.
func documentedMetrics(t *testing.T) map[string]docMetric {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "docs", "operations.md"))
	require.NoError(t, err)
	defer f.Close()
	out := map[string]docMetric{}
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "## ") {
			in = line == "## Metrics reference"
			continue
		}
		if !in || !strings.HasPrefix(line, "| `") {
			continue
		}
		cols := strings.Split(strings.Trim(line, "|"), "|")
		require.GreaterOrEqual(t, len(cols), 5, "a metrics reference row has five columns: %q", line)
		name := strings.Trim(strings.TrimSpace(cols[0]), "`")
		var d docMetric
		d.typ = strings.TrimSpace(cols[1])
		if l := strings.TrimSpace(cols[2]); l != "—" {
			for label := range strings.SplitSeq(l, ",") {
				d.labels = append(d.labels, strings.Trim(strings.TrimSpace(label), "`"))
			}
			slices.Sort(d.labels)
		}
		switch daemon := strings.TrimSpace(cols[3]); daemon {
		case "both":
			d.daemons = []string{"cloudcore", "edgecore"}
		case "cloudcore", "edgecore":
			d.daemons = []string{daemon}
		default:
			t.Fatalf("metrics reference row %q: daemon %q is not cloudcore, edgecore or both", line, daemon)
		}
		_, dup := out[name]
		require.False(t, dup, "%s is documented twice", name)
		out[name] = d
	}
	require.NoError(t, sc.Err())
	require.NotEmpty(t, out, "docs/operations.md has a \"## Metrics reference\" table")
	return out
}

// panelExpr is one PromQL expression of the dashboard.
type panelExpr struct{ panel, expr string }

// dashboardExprs returns every target expression of the Grafana
// dashboard, rows' nested panels included.
func dashboardExprs(t *testing.T) []panelExpr {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "build", "deploy", "grafana-dashboard.json"))
	require.NoError(t, err)
	type panel struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var dash struct {
		Title  string            `json:"title"`
		UID    string            `json:"uid"`
		Panels []json.RawMessage `json:"panels"`
	}
	require.NoError(t, json.Unmarshal(b, &dash))
	require.NotEmpty(t, dash.Title)
	require.NotEmpty(t, dash.UID)
	var out []panelExpr
	var walk func([]json.RawMessage)
	walk = func(ps []json.RawMessage) {
		for _, raw := range ps {
			var p panel
			require.NoError(t, json.Unmarshal(raw, &p))
			for _, tg := range p.Targets {
				require.NotEmpty(t, tg.Expr, "panel %q has a target without an expression", p.Title)
				out = append(out, panelExpr{panel: p.Title, expr: tg.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(dash.Panels)
	return out
}
