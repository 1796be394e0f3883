package vm

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
)

// phases are the values of the phase label, in the order of Phase's
// constants. A VM with no phase yet (the controller has not written its
// status) counts as Pending; a phase this build does not know (a status
// written by someone else) as Unknown, so the label's values stay few.
var phases = []Phase{PhasePending, PhaseScheduled, PhaseBooting, PhaseRunning, PhaseStopping, PhaseStopped, PhaseFailed, "Unknown"}

// phaseCollector is tether_vm_phase: the VirtualMachines in the leader's
// cache by status.phase, counted at each scrape. A replica that does not
// lead reports 0 for every phase, so a sum over replicas is the
// cluster's count.
type phaseCollector struct {
	desc *prometheus.Desc

	mu     sync.Mutex
	lister cache.GenericLister // nil while not leading
}

func newPhaseCollector() *phaseCollector {
	return &phaseCollector{desc: prometheus.NewDesc("tether_vm_phase",
		"VirtualMachines by status.phase in the leading VM controller's cache (0 on other replicas).", []string{"phase"}, nil)}
}

// set gives the collector the cache of a term that starts, or nil when it
// ends.
func (p *phaseCollector) set(l cache.GenericLister) {
	p.mu.Lock()
	p.lister = l
	p.mu.Unlock()
}

func (p *phaseCollector) Describe(ch chan<- *prometheus.Desc) { ch <- p.desc }

func (p *phaseCollector) Collect(ch chan<- prometheus.Metric) {
	counts := make(map[Phase]int, len(phases))
	p.mu.Lock()
	l := p.lister
	p.mu.Unlock()
	if l != nil {
		objs, err := l.List(labels.Everything())
		if err != nil {
			ch <- prometheus.NewInvalidMetric(p.desc, err)
			return
		}
		for _, o := range objs {
			u, ok := o.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			s, _, _ := unstructured.NestedString(u.Object, "status", "phase")
			phase := Phase(s)
			switch {
			case phase == "":
				phase = PhasePending
			case !knownPhase(phase):
				phase = "Unknown"
			}
			counts[phase]++
		}
	}
	for _, phase := range phases {
		m, err := prometheus.NewConstMetric(p.desc, prometheus.GaugeValue, float64(counts[phase]), string(phase))
		if err != nil {
			m = prometheus.NewInvalidMetric(p.desc, err)
		}
		ch <- m
	}
}

func knownPhase(p Phase) bool {
	for _, k := range phases[:len(phases)-1] {
		if k == p {
			return true
		}
	}
	return false
}
