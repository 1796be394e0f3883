package promtest

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
)

// recorder is a testing.TB whose Fatalf records the failure and ends the
// goroutine, as testing.T does.
type recorder struct {
	testing.TB
	failed string
}

func (r *recorder) Helper() {}

func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// trySum runs Sum as a test would and returns its result or its failure.
func trySum(t *testing.T, g prometheus.Gatherer, name string, want map[string]string) (float64, string) {
	r := &recorder{TB: t}
	var got float64
	done := make(chan struct{})
	go func() {
		defer close(done)
		got = Sum(r, g, name, want)
	}()
	<-done
	return got, r.failed
}

func TestSum(t *testing.T) {
	series := func(m *metrics) {
		m.sent.WithLabelValues("done").Add(2)
		m.sent.WithLabelValues("object").Add(3)
	}
	for _, tc := range []struct {
		name   string
		plain  bool // a prometheus.Registry rather than a Registry
		setup  func(*metrics)
		metric string
		want   map[string]string
		sum    float64
		fails  string // substring of the failure; "" means no failure
	}{
		{"registered vector without series is 0", false, nil, "e_sent_total", map[string]string{"kind": "done"}, 0, ""},
		{"unknown name fails", false, nil, "e_sent_totals", nil, 0, `no metric "e_sent_totals"`},
		{"unknown label fails", false, nil, "e_sent_total", map[string]string{"knd": "done"}, 0, `has no label "knd"`},
		{"const label is known", false, nil, "e_bytes_total", map[string]string{"side": `cl"o,ud`}, 0, ""},
		{"variable label after a const one is known", false, nil, "e_bytes_total", map[string]string{"direction": "in"}, 0, ""},
		{"series summed by label", false, series, "e_sent_total", map[string]string{"kind": "done"}, 2, ""},
		{"all series", false, series, "e_sent_total", nil, 5, ""},
		{"plain registry: vector with series", true, series, "e_sent_total", map[string]string{"kind": "object"}, 3, ""},
		{"plain registry: vector without series is unknown", true, nil, "e_sent_total", nil, 0, `no metric "e_sent_total"`},
		{"plain registry: plain counter is known at 0", true, nil, "e_resyncs_total", nil, 0, ""},
		{"plain registry: unknown label fails", true, series, "e_sent_total", map[string]string{"reason": "x"}, 0, `has no label "reason"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &metrics{
				sent:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "e_sent_total", Help: "h"}, []string{"kind"}),
				bytes:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "e_bytes_total", Help: `say "x", y`, ConstLabels: prometheus.Labels{"side": `cl"o,ud`}}, []string{"direction"}),
				resyncs: prometheus.NewCounter(prometheus.CounterOpts{Name: "e_resyncs_total", Help: "h"}),
			}
			var reg interface {
				prometheus.Registerer
				prometheus.Gatherer
			} = NewRegistry()
			if tc.plain {
				reg = prometheus.NewRegistry()
			}
			for _, c := range []prometheus.Collector{m.sent, m.bytes, m.resyncs} {
				require.NoError(t, reg.Register(c))
			}
			if tc.setup != nil {
				tc.setup(m)
			}
			got, failed := trySum(t, reg, tc.metric, tc.want)
			if tc.fails == "" {
				require.Empty(t, failed)
				require.Equal(t, tc.sum, got)
			} else {
				require.Contains(t, failed, tc.fails)
			}
		})
	}
}

// metrics are the collectors the cases register, as a component would.
type metrics struct {
	sent    *prometheus.CounterVec
	bytes   *prometheus.CounterVec
	resyncs prometheus.Counter
}

// Metrics lists every registered metric with its type and labels, a
// vector without series included.
func TestMetrics(t *testing.T) {
	reg := NewRegistry()
	for _, c := range []prometheus.Collector{
		prometheus.NewCounterVec(prometheus.CounterOpts{Name: "e_sent_total", Help: "h", ConstLabels: prometheus.Labels{"side": "cloud"}}, []string{"kind"}),
		prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "e_active", Help: "h"}, []string{"transport"}),
		prometheus.NewHistogram(prometheus.HistogramOpts{Name: "e_seconds", Help: "h"}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "e_running", Help: "h"}, func() float64 { return 1 }),
		prometheus.NewCounter(prometheus.CounterOpts{Name: "e_resyncs_total", Help: "h"}),
	} {
		require.NoError(t, reg.Register(c))
	}
	require.Equal(t, []Metric{
		{Name: "e_active", Type: "gauge", Labels: []string{"transport"}},
		{Name: "e_resyncs_total", Type: "counter"},
		{Name: "e_running", Type: "gauge"},
		{Name: "e_seconds", Type: "histogram"},
		{Name: "e_sent_total", Type: "counter", Labels: []string{"kind", "side"}},
	}, reg.Metrics())
}
