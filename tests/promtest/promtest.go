// Package promtest reads Prometheus counters in tests: the refusals, sends
// and bytes the components count are how tests prove what happened. Test
// support only; no production code imports it.
//
// A test that asserts a counter is 0 proves nothing if the name it reads no
// longer exists: Sum fails the test on a metric name, or a label name, that
// the gatherer does not know. A plain prometheus.Registry knows only the
// families it gathers, and a vector with no series yet is not gathered: read
// such a vector either after its component initialised the label values it
// uses (WithLabelValues at construction), or through a Registry, which also
// knows every family registered with it, series or not.
package promtest

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Registry is a prometheus.Registry that remembers the name and label names
// of every metric registered with it, so that Sum can tell a counter with no
// series yet (0) from a name that does not exist (a failure). Use it as the
// Registerer of the components under test.
type Registry struct {
	*prometheus.Registry

	mu         sync.Mutex
	labels     map[string][]string // metric name -> label names, const and variable
	collectors []prometheus.Collector
}

// NewRegistry returns an empty Registry.
func NewRegistry() *Registry {
	return &Registry{Registry: prometheus.NewRegistry(), labels: make(map[string][]string)}
}

// Register registers c and records its descriptors.
func (r *Registry) Register(c prometheus.Collector) error {
	if err := r.Registry.Register(c); err != nil {
		return err
	}
	descs := make(chan *prometheus.Desc)
	go func() {
		c.Describe(descs)
		close(descs)
	}()
	r.mu.Lock()
	defer r.mu.Unlock()
	for d := range descs {
		if name, labels, ok := parseDesc(d); ok {
			r.labels[name] = labels
		}
	}
	r.collectors = append(r.collectors, c)
	return nil
}

// Metric is one metric registered with a Registry.
type Metric struct {
	Name string
	// Type is counter, gauge, histogram, summary or untyped.
	Type string
	// Labels are its label names, const and variable, sorted.
	Labels []string
}

// Metrics returns every metric registered so far, sorted by name, with
// its type: that of its vector, or of what it collects now (a metric
// that collects nothing and is no vector is "untyped").
func (r *Registry) Metrics() []Metric {
	r.mu.Lock()
	cs := slices.Clone(r.collectors)
	r.mu.Unlock()
	types := map[string]string{}
	for _, c := range cs {
		vecType := ""
		switch c.(type) {
		case *prometheus.CounterVec:
			vecType = "counter"
		case *prometheus.GaugeVec:
			vecType = "gauge"
		case *prometheus.HistogramVec:
			vecType = "histogram"
		case *prometheus.SummaryVec:
			vecType = "summary"
		}
		descs := make(chan *prometheus.Desc)
		go func() {
			c.Describe(descs)
			close(descs)
		}()
		for d := range descs {
			if name, _, ok := parseDesc(d); ok {
				types[name] = vecType
			}
		}
		if vecType != "" {
			continue
		}
		ms := make(chan prometheus.Metric)
		go func() {
			c.Collect(ms)
			close(ms)
		}()
		for m := range ms {
			var d dto.Metric
			name, _, ok := parseDesc(m.Desc())
			if !ok || m.Write(&d) != nil {
				continue
			}
			switch {
			case d.Counter != nil:
				types[name] = "counter"
			case d.Gauge != nil:
				types[name] = "gauge"
			case d.Histogram != nil:
				types[name] = "histogram"
			case d.Summary != nil:
				types[name] = "summary"
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Metric, 0, len(r.labels))
	for name, labels := range r.labels {
		t := types[name]
		if t == "" {
			t = "untyped"
		}
		l := slices.Clone(labels)
		slices.Sort(l)
		out = append(out, Metric{Name: name, Type: t, Labels: l})
	}
	slices.SortFunc(out, func(a, b Metric) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// MustRegister registers each collector and panics on the first error.
func (r *Registry) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

// registered returns the label names of the metric name, and whether it was
// registered.
func (r *Registry) registered(name string) ([]string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	l, ok := r.labels[name]
	return l, ok
}

// Desc exposes its name and labels only through String, whose format
// (`Desc{fqName: "x", help: "...", constLabels: {k="v",...}, variableLabels:
// {a,c(b)}}`) has been stable across client_golang releases. Should it
// change, parsing fails and Sum reports the metric as unknown: loudly.
var (
	descRE       = regexp.MustCompile(`^Desc\{fqName: ("(?:[^"\\]|\\.)*"), help: "(?:[^"\\]|\\.)*", constLabels: \{(.*)\}, variableLabels: \{(.*)\}\}$`)
	constLabelRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"`)
)

func parseDesc(d *prometheus.Desc) (name string, labels []string, ok bool) {
	m := descRE.FindStringSubmatch(d.String())
	if m == nil {
		return "", nil, false
	}
	if _, err := fmt.Sscanf(m[1], "%q", &name); err != nil {
		return "", nil, false
	}
	for _, c := range constLabelRE.FindAllStringSubmatch(m[2], -1) {
		labels = append(labels, c[1])
	}
	for l := range strings.SplitSeq(m[3], ",") {
		l = strings.TrimSuffix(strings.TrimPrefix(l, "c("), ")")
		if l != "" {
			labels = append(labels, l)
		}
	}
	return name, labels, true
}

// Sum returns the total of the counter (or gauge) name over the series whose labels
// include every pair of want (nil: all series). It fails tb if name is not
// a metric g knows (gathered, or registered with a Registry), or if a label
// of want is not one of that metric's labels. Label values are not checked:
// a value that has not occurred yet is a sum of 0.
func Sum(tb testing.TB, g prometheus.Gatherer, name string, want map[string]string) float64 {
	tb.Helper()
	v, err := Value(g, name, want)
	if err != nil {
		tb.Fatalf("%v", err)
	}
	return v
}

// Value is Sum returning its failure, for conditions polled off the test's
// goroutine (require.Eventually), where tb.Fatalf must not be called.
func Value(g prometheus.Gatherer, name string, want map[string]string) (float64, error) {
	mfs, err := g.Gather()
	if err != nil {
		return 0, fmt.Errorf("promtest: gather metrics: %w", err)
	}
	var labels []string
	known := false
	if r, ok := g.(*Registry); ok {
		labels, known = r.registered(name)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		known = true
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if !slices.Contains(labels, l.GetName()) {
					labels = append(labels, l.GetName())
				}
			}
		}
		total += sum(mf, want)
	}
	if !known {
		return 0, fmt.Errorf("promtest: no metric %q is registered or gathered (renamed, or a vector whose label values were never initialised?)", name)
	}
	for k := range want {
		if !slices.Contains(labels, k) {
			return 0, fmt.Errorf("promtest: metric %q has no label %q (it has %v)", name, k, labels)
		}
	}
	return total, nil
}

func sum(mf *dto.MetricFamily, want map[string]string) float64 {
	total := 0.0
series:
	for _, m := range mf.GetMetric() {
		for k, v := range want {
			if labelValue(m, k) != v {
				continue series
			}
		}
		total += m.GetCounter().GetValue() + m.GetGauge().GetValue()
	}
	return total
}

func labelValue(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
