package pods

import (
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
)

// podPhases are the phases tether_pods_phase reports, every one present
// from the start; any other phase counts as Unknown.
var podPhases = []corev1.PodPhase{corev1.PodPending, corev1.PodRunning, corev1.PodSucceeded, corev1.PodFailed, corev1.PodUnknown}

// phaseCollector counts the manager's pods by the phase of the status it
// last published (or found published after a restart), at each scrape:
// nothing is kept per event, so the counts cannot drift. A pod whose
// deletion was published or that left the store is not counted.
type phaseCollector struct {
	m    *Manager
	desc *prometheus.Desc
}

func newPhaseCollector(m *Manager) *phaseCollector {
	return &phaseCollector{m: m, desc: prometheus.NewDesc("tether_pods_phase",
		"Pods of the pod manager by the phase of their latest status.", []string{"phase"}, nil)}
}

func (c *phaseCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *phaseCollector) Collect(ch chan<- prometheus.Metric) {
	counts := make(map[corev1.PodPhase]int, len(podPhases))
	c.m.mu.Lock()
	for _, p := range c.m.published {
		counts[p.status.Phase]++
	}
	c.m.mu.Unlock()
	other := 0
	for ph, n := range counts {
		switch ph {
		case corev1.PodPending, corev1.PodRunning, corev1.PodSucceeded, corev1.PodFailed, corev1.PodUnknown:
		default:
			other += n
		}
	}
	for _, ph := range podPhases {
		n := counts[ph]
		if ph == corev1.PodUnknown {
			n += other
		}
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), string(ph))
	}
}
