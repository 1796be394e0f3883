package pods

import (
	"cmp"
	"context"
	"errors"
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
	// targets are what each probe checks, resolved once when the
	// container is tracked: named ports, $(VAR) in exec commands.
	targets  [probeKinds]probeTarget
	counters [probeKinds]probeCounter
	result   probeResult
}

// probeTarget is a probe's resolved port (httpGet, tcpSocket) or command
// (exec); err, when set, fails every run of the probe with that reason.
type probeTarget struct {
	port    string
	command []string
	err     error
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
// its first probes by their initialDelaySeconds. For a container it did
// not track yet, it returns the reasons why probes cannot work (a port
// name the container does not have): those probes fail on every run.
func (p *prober) track(podKey, id, host string, c *corev1.Container, startedAt time.Time) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.entries[id]; ok {
		return nil
	}
	e := &probeEntry{podKey: podKey, containerID: id, host: host,
		probes: [probeKinds]*corev1.Probe{c.StartupProbe, c.ReadinessProbe, c.LivenessProbe}}
	e.result.started = c.StartupProbe == nil
	var errs []error
	for k, pr := range e.probes {
		if pr != nil {
			e.counters[k].next = startedAt.Add(time.Duration(pr.InitialDelaySeconds) * time.Second)
			e.targets[k] = resolveTarget(pr, c)
			if err := e.targets[k].err; err != nil {
				errs = append(errs, fmt.Errorf("%s probe: %w", probeKind(k), err))
			}
		}
	}
	p.entries[id] = e
	return errors.Join(errs...)
}

func (k probeKind) String() string {
	switch k {
	case startupProbe:
		return "startup"
	case readinessProbe:
		return "readiness"
	case livenessProbe:
		return "liveness"
	}
	return "unknown"
}

// resolveTarget resolves what probe pr of container c checks, as kubelet
// does: a named port is the containerPort of c's port of that name (a
// number written as a string is taken as the number), and an exec
// command gets $(VAR) expanded against c's plain env values.
func resolveTarget(pr *corev1.Probe, c *corev1.Container) probeTarget {
	var port intstr.IntOrString
	switch h := pr.ProbeHandler; {
	case h.Exec != nil:
		return probeTarget{command: expandAll(h.Exec.Command, staticEnv(c))}
	case h.HTTPGet != nil:
		port = h.HTTPGet.Port
	case h.TCPSocket != nil:
		port = h.TCPSocket.Port
	case h.GRPC != nil:
		return probeTarget{err: errors.New("grpc probes are not supported")}
	default:
		return probeTarget{err: errors.New("the probe has no handler")}
	}
	n, err := probePort(port, c)
	if err != nil {
		return probeTarget{err: err}
	}
	return probeTarget{port: strconv.Itoa(n)}
}

// probePort is the port number a probe names.
func probePort(p intstr.IntOrString, c *corev1.Container) (int, error) {
	n := p.IntValue()
	if p.Type == intstr.String {
		n = -1
		for _, cp := range c.Ports {
			if cp.Name == p.StrVal {
				n = int(cp.ContainerPort)
				break
			}
		}
		if n < 0 {
			v, err := strconv.Atoi(p.StrVal)
			if err != nil {
				return 0, fmt.Errorf("port %q: container %s has no port of that name", p.StrVal, c.Name)
			}
			n = v
		}
	}
	if n <= 0 || n > 65535 {
		return 0, fmt.Errorf("port %s: not a port number (1-65535)", p.String())
	}
	return n, nil
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
			out = append(out, probeRun{id: e.containerID, podKey: e.podKey, host: e.host, kind: probeKind(k), probe: pr, target: e.targets[k]})
		}
	}
	return out
}

// probeRun is one probe to run.
type probeRun struct {
	id, podKey, host string
	kind             probeKind
	probe            *corev1.Probe
	target           probeTarget
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
				err := m.runProbe(ctx, r)
				if ctx.Err() != nil {
					return nil // shutting down: a failure now means nothing
				}
				if err != nil {
					if ok, suppressed := m.lim.Allow("probe " + r.id + " " + r.kind.String()); ok {
						m.logger.Info("probe failed", "pod", r.podKey, "container_id", r.id, "probe", r.kind.String(),
							"error", err, "suppressed", suppressed)
					}
				}
				if key, changed := m.prober.record(r, err == nil, m.cfg.Clock.Now()); changed {
					m.Enqueue(key)
				}
				return nil
			})
		}
	}
}

// runProbe runs one exec, tcpSocket or httpGet probe within its timeout;
// nil is success, an error says why it failed.
func (m *Manager) runProbe(ctx context.Context, r probeRun) error {
	if r.target.err != nil {
		return r.target.err
	}
	timeout := time.Duration(max(r.probe.TimeoutSeconds, 1)) * time.Second
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	h := r.probe.ProbeHandler
	switch {
	case h.Exec != nil:
		if _, _, err := m.rt.ExecSync(ctx, r.id, r.target.command, timeout); err != nil {
			return fmt.Errorf("exec %q: %w", r.target.command, err)
		}
		return nil
	case h.TCPSocket != nil:
		host := cmp.Or(h.TCPSocket.Host, r.host)
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, r.target.port))
		if err != nil {
			return fmt.Errorf("connect: %w", err)
		}
		_ = conn.Close()
		return nil
	case h.HTTPGet != nil:
		g := h.HTTPGet
		host := cmp.Or(g.Host, r.host)
		scheme := "http"
		if g.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		url := fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, r.target.port), g.Path)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return fmt.Errorf("build request: %w", err)
		}
		for _, hd := range g.HTTPHeaders {
			req.Header.Add(hd.Name, hd.Value)
		}
		resp, err := m.httpProbe.Do(req)
		if err != nil {
			return fmt.Errorf("get %s: %w", url, err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("get %s: status %d", url, resp.StatusCode)
		}
		return nil
	}
	return errors.New("the probe has no handler")
}
