package hollow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// BuildCloudCore builds the cloudcore command into dir and returns the
// binary's path. It runs `go build`, so it needs the module's source (the
// working directory inside the repository) and takes seconds when the
// build cache is warm.
func BuildCloudCore(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "cloudcore")
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/tetheredge/tether/cloudcore/cmd/cloudcore").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build cloudcore: %w\n%s", err, out)
	}
	return bin, nil
}

// CloudCoreConfig configures a CloudCore process.
type CloudCoreConfig struct {
	// Binary is the cloudcore command (BuildCloudCore). Required.
	Binary string
	// KubeConfig is the path of the kubeconfig it is given. Required.
	KubeConfig string
	// Dir holds its log (cloudcore.log). Required.
	Dir string
	// Addr is the host:port of its QUIC (UDP) and WebSocket (TCP)
	// listeners. Default a free port on 127.0.0.1, kept across restarts.
	Addr string
	// Args are more flags, such as --keepalive.
	Args []string
}

// CloudCore is the cloudcore command running as a child process, so that
// its memory and CPU are its own. Its join endpoint and operations
// endpoint listen on free loopback ports.
type CloudCore struct {
	cfg        CloudCoreConfig
	joinAddr   string
	opsAddr    string
	mu         sync.Mutex
	cmd        *exec.Cmd
	exited     chan struct{}
	runs       int
	httpClient *http.Client
}

// StartCloudCore starts CloudCore and returns once it is ready (its
// informers synced and its listeners bound: /readyz).
func StartCloudCore(ctx context.Context, cfg CloudCoreConfig) (*CloudCore, error) {
	if cfg.Binary == "" || cfg.KubeConfig == "" || cfg.Dir == "" {
		return nil, errors.New("hollow: CloudCore needs a binary, a kubeconfig and a directory")
	}
	c := &CloudCore{cfg: cfg, httpClient: &http.Client{Timeout: 10 * time.Second}}
	var err error
	if c.cfg.Addr == "" {
		if c.cfg.Addr, err = freeUDPTCPPort(); err != nil {
			return nil, err
		}
	}
	if c.joinAddr, err = freeTCPPort(); err != nil {
		return nil, err
	}
	if c.opsAddr, err = freeTCPPort(); err != nil {
		return nil, err
	}
	if err := c.Start(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Addr is the tunnel address, as edges are given it.
func (c *CloudCore) Addr() string { return "quic://" + c.cfg.Addr }

// Start starts the process again after Kill, on the same addresses, and
// waits until it is ready.
func (c *CloudCore) Start(ctx context.Context) error {
	c.mu.Lock()
	if c.cmd != nil {
		c.mu.Unlock()
		return errors.New("hollow: CloudCore is running")
	}
	c.runs++
	run := c.runs
	c.mu.Unlock()
	log, err := os.OpenFile(filepath.Join(c.cfg.Dir, "cloudcore.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open CloudCore log: %w", err)
	}
	defer log.Close()
	fmt.Fprintf(log, "=== hollow: cloudcore run %d starts at %s\n", run, time.Now().Format(time.StampMilli))
	args := append([]string{
		"--kubeconfig", c.cfg.KubeConfig,
		"--quic-addr", c.cfg.Addr, "--websocket-addr", c.cfg.Addr, "--join-addr", c.joinAddr,
		"--metrics-addr", c.opsAddr, "--server-san", "127.0.0.1",
		"--vm-controller=false", "--offline-autonomy=0", "--log-level", "warn",
	}, c.cfg.Args...)
	cmd := exec.Command(c.cfg.Binary, args...)
	cmd.Stdout, cmd.Stderr = log, log
	// CloudCore never outlives the process that started it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start cloudcore: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	c.mu.Lock()
	c.cmd, c.exited = cmd, exited
	c.mu.Unlock()
	return c.waitReady(ctx, exited)
}

// waitReady polls /readyz until it answers 200, the process exits or ctx
// ends (bounded at two minutes).
func (c *CloudCore) waitReady(ctx context.Context, exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if c.Ready(ctx) {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("cloudcore exited before it was ready; see %s", filepath.Join(c.cfg.Dir, "cloudcore.log"))
		case <-ctx.Done():
			return fmt.Errorf("wait for cloudcore to be ready: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// Ready reports whether /readyz answers 200.
func (c *CloudCore) Ready(ctx context.Context) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.opsAddr+"/readyz", nil)
	if err != nil {
		return false
	}
	resp, err := c.httpClient.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// Kill sends SIGKILL and waits for the process to be gone; it does
// nothing when none runs.
func (c *CloudCore) Kill() {
	c.signal(syscall.SIGKILL)
}

// Quit sends SIGQUIT, on which the Go runtime writes every goroutine's
// stack to the log before exiting, and waits for the process to end.
func (c *CloudCore) Quit() {
	c.signal(syscall.SIGQUIT)
}

// Pid is the running process's id, 0 when none runs.
func (c *CloudCore) Pid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return 0
	}
	return c.cmd.Process.Pid
}

// LogPath is the file CloudCore's output goes to.
func (c *CloudCore) LogPath() string { return filepath.Join(c.cfg.Dir, "cloudcore.log") }

// Stop sends SIGTERM and waits for the process to end.
func (c *CloudCore) Stop() {
	c.signal(syscall.SIGTERM)
}

func (c *CloudCore) signal(sig syscall.Signal) {
	c.mu.Lock()
	cmd, exited := c.cmd, c.exited
	c.cmd = nil
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
	}
}

// Metrics gathers CloudCore's /metrics.
func (c *CloudCore) Metrics(ctx context.Context) (Metrics, error) {
	return scrape(ctx, c.httpClient, "http://"+c.opsAddr+"/metrics")
}

// Profile writes CloudCore's runtime profile name (heap, goroutine, ...)
// from its /debug/pprof/ to path; CloudCore must run with --pprof. A
// heap profile is taken after a GC (gc=1), so that it shows what is live.
func (c *CloudCore) Profile(ctx context.Context, name, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.opsAddr+"/debug/pprof/"+name+"?gc=1", nil)
	if err != nil {
		return fmt.Errorf("profile %s: %w", name, err)
	}
	resp, err := c.httpClient.Do(req)
	if err != nil {
		return fmt.Errorf("profile %s: %w", name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("profile %s: %s (does CloudCore run with --pprof?)", name, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("profile %s: %w", name, err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("profile %s: %w", name, err)
	}
	return nil
}

// Metrics are metric families as scraped.
type Metrics map[string]*dto.MetricFamily

// Sum adds the values of the series of family name whose labels include
// want (counters, gauges and untyped). An unknown name is an error, so
// that a renamed metric does not read as 0.
func (m Metrics) Sum(name string, want map[string]string) (float64, error) {
	mf, ok := m[name]
	if !ok {
		return 0, fmt.Errorf("no metric %s", name)
	}
	var total float64
	for _, s := range mf.GetMetric() {
		if !hasLabels(s, want) {
			continue
		}
		switch {
		case s.Counter != nil:
			total += s.Counter.GetValue()
		case s.Gauge != nil:
			total += s.Gauge.GetValue()
		case s.Untyped != nil:
			total += s.Untyped.GetValue()
		}
	}
	return total, nil
}

// By sums family name by the value of label, for series whose labels
// include want.
func (m Metrics) By(name, label string, want map[string]string) (map[string]float64, error) {
	mf, ok := m[name]
	if !ok {
		return nil, fmt.Errorf("no metric %s", name)
	}
	out := map[string]float64{}
	for _, s := range mf.GetMetric() {
		if !hasLabels(s, want) {
			continue
		}
		var v float64
		switch {
		case s.Counter != nil:
			v = s.Counter.GetValue()
		case s.Gauge != nil:
			v = s.Gauge.GetValue()
		case s.Untyped != nil:
			v = s.Untyped.GetValue()
		}
		for _, l := range s.GetLabel() {
			if l.GetName() == label {
				out[l.GetValue()] += v
			}
		}
	}
	return out, nil
}

func hasLabels(s *dto.Metric, want map[string]string) bool {
	for k, v := range want {
		found := false
		for _, l := range s.GetLabel() {
			if l.GetName() == k {
				found = l.GetValue() == v
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// scrape reads a Prometheus text exposition.
func scrape(ctx context.Context, client *http.Client, url string) (Metrics, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	return parseMetrics(resp.Body)
}

func parseMetrics(r io.Reader) (Metrics, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	return Metrics(mfs), nil
}

// freeTCPPort returns a loopback address whose TCP port was free a moment
// ago.
func freeTCPPort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	addr := l.Addr().String()
	return addr, l.Close()
}

// freeUDPTCPPort returns a loopback address whose port was free for both
// UDP and TCP a moment ago.
func freeUDPTCPPort() (string, error) {
	for range 20 {
		u, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return "", fmt.Errorf("find a free port: %w", err)
		}
		port := u.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		_ = u.Close()
		if err == nil {
			_ = l.Close()
			return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), nil
		}
	}
	return "", errors.New("find a free port: no port free for both UDP and TCP")
}
