package pods

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probeKind is one of a container's three probes.
type probeKind int

const (
	startupProbe probeKind = iota
	readinessProbe
	livenessProbe
	probeKinds
)

// probeResult is what the probes of one running container say now.
type probeResult struct {
	// started: the startup probe succeeded (true without one).
	started bool
	// ready: the readiness probe succeeded (meaningless without one).
	ready bool
	// failed names the probe (startup or liveness) whose failure threshold
	// was reached: the container is to be killed. Empty: none.
	failed string
}

// probeCounter tracks one probe of one container.
type probeCounter struct {
	next                time.Time
	successes, failures int32
	running             bool
}

// probeEntry is a running container with probes.
type probeEntry struct {
	podKey, containerID, host string
	probes                    [probeKinds]*corev1.Probe
	counters                  [probeKinds]probeCounter
	result                    probeResult
}

// prober runs the probes of running containers. sync registers each
// running container that has probes and drops the ones that are gone; the
// manager's probe loop runs the probes that are due and enqueues the pod
// when a result changes. It holds no goroutines of its own.
type prober struct {
	mu      sync.Mutex
	entries map[string]*probeEntry // by container ID
}

func hasProbes(c *corev1.Container) bool {
	return c.StartupProbe != nil || c.ReadinessProbe != nil || c.LivenessProbe != nil
}

// track registers a running container that has probes; startedAt delays
// its first probes by their initialDelaySeconds.
func (p *prober) track(podKey, id, host string, c *corev1.Container, startedAt time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.entries[id]; ok {
		return
	}
	e := &probeEntry{podKey: podKey, containerID: id, host: host,
		probes: [probeKinds]*corev1.Probe{c.StartupProbe, c.ReadinessProbe, c.LivenessProbe}}
	e.result.started = c.StartupProbe == nil
	for k, pr := range e.probes {
		if pr != nil {
			e.counters[k].next = startedAt.Add(time.Duration(pr.InitialDelaySeconds) * time.Second)
		}
	}
	p.entries[id] = e
}

// result returns the container's probe result; ok is false when it has
// no probes tracked.
func (p *prober) result(id string) (probeResult, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.entries[id]
	if !ok {
		return probeResult{}, false
	}
	return e.result, true
}

// retain drops the entries of podKey whose container is not in keep.
func (p *prober) retain(podKey string, keep map[string]bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, e := range p.entries {
		if e.podKey == podKey && !keep[id] {
			delete(p.entries, id)
		}
	}
}

// due returns the probes to run now and marks them running.
func (p *prober) due(now time.Time) []probeRun {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []probeRun
	for _, e := range p.entries {
		for k, pr := range e.probes {
			c := &e.counters[k]
			if pr == nil || c.running || now.Before(c.next) {
				continue
			}
			// Readiness and liveness wait for the startup probe.
			if probeKind(k) != startupProbe && !e.result.started {
				continue
			}
			if probeKind(k) == startupProbe && e.result.started {
				continue
			}
			c.running = true
			out = append(out, probeRun{id: e.containerID, host: e.host, kind: probeKind(k), probe: pr})
		}
	}
	return out
}

// probeRun is one probe to run.
type probeRun struct {
	id, host string
	kind     probeKind
	probe    *corev1.Probe
}

// record applies a probe's outcome and returns the pod key to enqueue
// when the container's result changed.
func (p *prober) record(r probeRun, ok bool, now time.Time) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, found := p.entries[r.id]
	if !found {
		return "", false
	}
	c := &e.counters[r.kind]
	c.running = false
	c.next = now.Add(time.Duration(max(r.probe.PeriodSeconds, 1)) * time.Second)
	if ok {
		c.successes, c.failures = c.successes+1, 0
	} else {
		c.successes, c.failures = 0, c.failures+1
	}
	before := e.result
	success := c.successes >= max(r.probe.SuccessThreshold, 1)
	failure := c.failures >= max(r.probe.FailureThreshold, 1)
	switch r.kind {
	case startupProbe:
		if success {
			e.result.started = true
		} else if failure {
			e.result.failed = "startup"
		}
	case readinessProbe:
		if success {
			e.result.ready = true
		} else if failure {
			e.result.ready = false
		}
	case livenessProbe:
		if failure {
			e.result.failed = "liveness"
		}
	}
	return e.podKey, e.result != before
}

// probeLoop runs due probes every tick until ctx ends.
func (m *Manager) probeLoop(ctx context.Context, spawn func(func() error)) error {
	t := m.cfg.Clock.NewTicker(m.cfg.ProbeTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
		}
		for _, r := range m.prober.due(m.cfg.Clock.Now()) {
			spawn(func() error {
				ok := m.runProbe(ctx, r)
				if ctx.Err() != nil {
					return nil // shutting down: a failure now means nothing
				}
				if key, changed := m.prober.record(r, ok, m.cfg.Clock.Now()); changed {
					m.Enqueue(key)
				}
				return nil
			})
		}
	}
}

// runProbe runs one exec, tcpSocket or httpGet probe within its timeout.
func (m *Manager) runProbe(ctx context.Context, r probeRun) bool {
	timeout := time.Duration(max(r.probe.TimeoutSeconds, 1)) * time.Second
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	h := r.probe.ProbeHandler
	switch {
	case h.Exec != nil:
		_, _, err := m.rt.ExecSync(ctx, r.id, h.Exec.Command, timeout)
		return err == nil
	case h.TCPSocket != nil:
		host := h.TCPSocket.Host
		if host == "" {
			host = r.host
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, portOf(h.TCPSocket.Port)))
		if err != nil {
			return false
		}
		_ = conn.Close()
		return true
	case h.HTTPGet != nil:
		g := h.HTTPGet
		host := g.Host
		if host == "" {
			host = r.host
		}
		scheme := "http"
		if g.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		url := fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, portOf(g.Port)), g.Path)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return false
		}
		for _, hd := range g.HTTPHeaders {
			req.Header.Add(hd.Name, hd.Value)
		}
		resp, err := m.httpProbe.Do(req)
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode >= 200 && resp.StatusCode < 400
	}
	return false
}

// portOf returns a probe's port; named ports are not resolved.
func portOf(p intstr.IntOrString) string {
	if p.Type == intstr.Int {
		return strconv.Itoa(p.IntValue())
	}
	return p.StrVal
}
