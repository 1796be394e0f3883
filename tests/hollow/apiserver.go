package hollow

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"time"

	dto "github.com/prometheus/client_model/go"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// APISample is what the API server's /metrics says of the requests it
// served so far (all clients: the families have no client label), for
// resource requests only (non-resource ones, such as the scrape itself,
// have no resource). Two samples give a window (Sub).
type APISample struct {
	// Requests are apiserver_request_total by verb.
	Requests map[string]float64
	// Failed are the requests answered 429 or 5xx (a timeout is 504), by
	// verb.
	Failed map[string]float64
	// durations are apiserver_request_duration_seconds by verb.
	durations map[string]*histogram
}

// histogram is a cumulative Prometheus histogram: counts[i] requests
// took at most bounds[i] seconds.
type histogram struct {
	bounds []float64
	counts []float64
	count  float64
	sum    float64
}

// SampleAPI scrapes the API server's request counts and durations.
func SampleAPI(ctx context.Context, cfg *rest.Config) (APISample, error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return APISample{}, fmt.Errorf("build clientset: %w", err)
	}
	raw, err := cs.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return APISample{}, fmt.Errorf("scrape the API server: %w", err)
	}
	m, err := parseMetrics(bytes.NewReader(raw))
	if err != nil {
		return APISample{}, err
	}
	total, ok := m["apiserver_request_total"]
	if !ok {
		return APISample{}, fmt.Errorf("the API server has no apiserver_request_total")
	}
	s := APISample{Requests: map[string]float64{}, Failed: map[string]float64{}, durations: map[string]*histogram{}}
	for _, x := range total.GetMetric() {
		l := labels(x)
		if l["resource"] == "" {
			continue
		}
		v := x.GetCounter().GetValue()
		s.Requests[l["verb"]] += v
		if code, _ := strconv.Atoi(l["code"]); code == 429 || code >= 500 {
			s.Failed[l["verb"]] += v
		}
	}
	if dur, ok := m["apiserver_request_duration_seconds"]; ok {
		for _, x := range dur.GetMetric() {
			l := labels(x)
			if l["resource"] == "" || x.GetHistogram() == nil {
				continue
			}
			s.durations[l["verb"]] = s.durations[l["verb"]].add(x.GetHistogram())
		}
	}
	return s, nil
}

func labels(m *dto.Metric) map[string]string {
	out := make(map[string]string, len(m.GetLabel()))
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// add adds p's buckets to h (nil: a new histogram); the series of one
// family share their bounds.
func (h *histogram) add(p *dto.Histogram) *histogram {
	if h == nil {
		h = &histogram{}
		for _, b := range p.GetBucket() {
			h.bounds = append(h.bounds, b.GetUpperBound())
		}
		h.counts = make([]float64, len(h.bounds))
	}
	for i, b := range p.GetBucket() {
		if i < len(h.counts) {
			h.counts[i] += float64(b.GetCumulativeCount())
		}
	}
	h.count += float64(p.GetSampleCount())
	h.sum += p.GetSampleSum()
	return h
}

// Sub is the window from o to s: what s counts that o did not.
func (s APISample) Sub(o APISample) APISample {
	sub := func(a, b map[string]float64) map[string]float64 {
		out := map[string]float64{}
		for k, v := range a {
			if d := v - b[k]; d != 0 {
				out[k] = d
			}
		}
		return out
	}
	w := APISample{Requests: sub(s.Requests, o.Requests), Failed: sub(s.Failed, o.Failed), durations: map[string]*histogram{}}
	for verb, h := range s.durations {
		d := &histogram{bounds: h.bounds, counts: slices.Clone(h.counts), count: h.count, sum: h.sum}
		if p := o.durations[verb]; p != nil && len(p.counts) == len(d.counts) {
			for i := range d.counts {
				d.counts[i] -= p.counts[i]
			}
			d.count -= p.count
			d.sum -= p.sum
		}
		if d.count > 0 {
			w.durations[verb] = d
		}
	}
	return w
}

// Latency returns the mean and the q-quantile (0..1) of verb's request
// durations in the sample (a window, after Sub), the quantile
// interpolated within its bucket as Prometheus' histogram_quantile does;
// beyond the last finite bound it is that bound. Zero when verb had no
// request.
func (s APISample) Latency(verb string, q float64) (mean, quantile time.Duration) {
	h := s.durations[verb]
	if h == nil || h.count <= 0 {
		return 0, 0
	}
	secs := func(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }
	rank := q * h.count
	lower, below := 0.0, 0.0
	for i, upper := range h.bounds {
		if h.counts[i] >= rank {
			if math.IsInf(upper, 1) {
				return secs(h.sum / h.count), secs(lower)
			}
			in := h.counts[i] - below
			frac := 1.0
			if in > 0 {
				frac = (rank - below) / in
			}
			return secs(h.sum / h.count), secs(lower + (upper-lower)*frac)
		}
		lower, below = upper, h.counts[i]
	}
	return secs(h.sum / h.count), secs(lower)
}

// Verbs returns the verbs with a duration in the sample, sorted.
func (s APISample) Verbs() []string { return slices.Sorted(maps.Keys(s.durations)) }
