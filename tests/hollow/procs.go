package hollow

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/tunnel"
)

// DefaultPerProcess is how many hollow edges one child process runs at
// most: a hollow edge holds about 6 open files (its QUIC socket, its
// SQLite connections and WAL), and a process here may hold 20,000 (the
// hard limit; root lacks CAP_SYS_RESOURCE to raise it), so 2,500 edges
// leave room for the rest.
const DefaultPerProcess = 2500

// FilesPerEdge is how many open files a hollow edge is counted for when a
// process checks that its edges fit under its limit (6 measured, and one
// spare).
const FilesPerEdge = 7

// RaiseFileLimit raises this process's soft RLIMIT_NOFILE to its hard
// limit (the Go runtime does so at start already; this says it and
// returns the limit), and returns an error when edges hollow edges would
// not fit under it.
func RaiseFileLimit(edges int) (uint64, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, fmt.Errorf("read the open file limit: %w", err)
	}
	if l.Cur < l.Max {
		l.Cur = l.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
			return 0, fmt.Errorf("raise the open file limit to %d: %w", l.Max, err)
		}
	}
	// 100 for the rest of the process: its clients, logs and listeners.
	if need := uint64(edges*FilesPerEdge + 100); need > l.Cur {
		return l.Cur, fmt.Errorf("hollow: %d edges need about %d open files, the limit is %d: spread them over several processes (hollowedge scale --per-process)", edges, need, l.Cur)
	}
	return l.Cur, nil
}

// identitiesFile is how a scale run hands a child process its edges'
// identities: PEM blocks in JSON.
type identitiesFile struct {
	CA    string `json:"ca"`
	Edges []struct {
		Node string `json:"node"`
		Cert string `json:"cert"`
		Key  string `json:"key"`
	} `json:"edges"`
}

// WriteIdentities writes ca and ids to path (mode 0600: it holds keys).
func WriteIdentities(path string, ca *x509.Certificate, ids []Identity) error {
	f := identitiesFile{CA: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}))}
	for _, id := range ids {
		key, err := x509.MarshalPKCS8PrivateKey(id.Cert.PrivateKey)
		if err != nil {
			return fmt.Errorf("encode the key of %s: %w", id.Node, err)
		}
		f.Edges = append(f.Edges, struct {
			Node string `json:"node"`
			Cert string `json:"cert"`
			Key  string `json:"key"`
		}{id.Node, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: id.Cert.Leaf.Raw})),
			string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}))})
	}
	b, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("encode identities: %w", err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("write identities: %w", err)
	}
	return nil
}

// ReadIdentities reads what WriteIdentities wrote.
func ReadIdentities(path string) ([]Identity, *x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read identities: %w", err)
	}
	var f identitiesFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, nil, fmt.Errorf("decode identities %s: %w", path, err)
	}
	ca, err := parseCert(f.CA)
	if err != nil {
		return nil, nil, fmt.Errorf("decode the CA of %s: %w", path, err)
	}
	ids := make([]Identity, 0, len(f.Edges))
	for _, e := range f.Edges {
		cert, err := parseCert(e.Cert)
		if err != nil {
			return nil, nil, fmt.Errorf("decode the certificate of %s: %w", e.Node, err)
		}
		blk, _ := pem.Decode([]byte(e.Key))
		if blk == nil {
			return nil, nil, fmt.Errorf("decode the key of %s: no PEM block", e.Node)
		}
		key, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("decode the key of %s: %w", e.Node, err)
		}
		ids = append(ids, Identity{Node: e.Node, Cert: tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}})
	}
	return ids, ca, nil
}

func parseCert(s string) (*x509.Certificate, error) {
	blk, _ := pem.Decode([]byte(s))
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("no CERTIFICATE PEM block")
	}
	return x509.ParseCertificate(blk.Bytes)
}

// ServeReports answers the fleet's reports on a Unix socket at path (POST
// /report with a Query as JSON; the Report as JSON) until ctx ends.
func ServeReports(ctx context.Context, f *Fleet, path string) error {
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("listen for reports: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /report", func(w http.ResponseWriter, r *http.Request) {
		var q Query
		if err := json.NewDecoder(r.Body).Decode(&q); err != nil {
			http.Error(w, "decode query: "+err.Error(), http.StatusBadRequest)
			return
		}
		rep, err := f.Report(r.Context(), q)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(rep)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	stop := context.AfterFunc(ctx, func() { _ = srv.Close() })
	defer stop()
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve reports: %w", err)
	}
	return nil
}

// ProcsConfig configures the child processes of a scale run. Zero values
// mean the defaults beside each field.
type ProcsConfig struct {
	// Binary is the hollowedge command. Required.
	Binary string
	// Dir holds each child's identities, report socket, log
	// (hollow-K.log) and stores (a tmpfs). Required.
	Dir string
	// Cloud are the CloudCore addresses. Required.
	Cloud []string
	// CA is the cluster CA. Required.
	CA *x509.Certificate
	// PerProcess is the most edges one child runs. Default
	// DefaultPerProcess.
	PerProcess int
	// Rate is how many edges start per second over all children (each
	// starts its share); 0: all at once.
	Rate float64
	// Namespace and ConfigMap name the watched ConfigMap (Workload).
	Namespace, ConfigMap string
	// LeaseDuration, StatusEvery and Backoff are the edges' (the run
	// command's defaults when zero).
	LeaseDuration, StatusEvery time.Duration
	Backoff                    tunnel.Backoff
	// KeepAlive and DeadPeerTimeout are the edges' tunnel timings
	// (tunnel's defaults when zero).
	KeepAlive, DeadPeerTimeout time.Duration
	// Nice, when positive, runs each child at that niceness (nice(1)),
	// so that CloudCore and the API server, whose figures a run
	// measures, get the CPU first on a machine the simulator shares
	// with them. 0: the scale run's own.
	Nice int
	// GOMAXPROCS, when positive, is each child's GOMAXPROCS: with one P
	// a child's Go scheduler wakes no idle thread for every packet its
	// edges receive, which on 2 cores is a third of an idle child's CPU
	// (docs/benchmarks.md, "Hollow edges"). 0: the runtime's default.
	GOMAXPROCS int
	// Logger gets progress lines.
	Logger *slog.Logger
}

// Procs are hollow edges spread over child `hollowedge run` processes,
// each with its own file limit, reporting over its socket.
type Procs struct {
	cfg      ProcsConfig
	children []*child
}

type child struct {
	k      int
	edges  int
	cmd    *exec.Cmd
	log    string
	client *http.Client
	exited chan struct{}
	mu     sync.Mutex
	err    error // how it exited, once exited is closed
}

// StartProcs writes each child's identities, starts the children, and
// returns once every child answers on its socket.
func StartProcs(ctx context.Context, cfg ProcsConfig, ids []Identity) (*Procs, error) {
	if cfg.Binary == "" || cfg.Dir == "" || len(cfg.Cloud) == 0 || cfg.CA == nil {
		return nil, errors.New("hollow: child processes need a binary, a directory, cloud addresses and the CA")
	}
	if cfg.PerProcess <= 0 {
		cfg.PerProcess = DefaultPerProcess
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	n := (len(ids) + cfg.PerProcess - 1) / cfg.PerProcess
	p := &Procs{cfg: cfg}
	for k := range n {
		// Edges dealt round-robin, so that every child starts its share
		// at the same pace and a rate spreads evenly.
		var mine []Identity
		for i := k; i < len(ids); i += n {
			mine = append(mine, ids[i])
		}
		c, err := p.start(k, mine, n)
		if err != nil {
			return nil, errors.Join(err, p.Stop())
		}
		p.children = append(p.children, c)
	}
	for _, c := range p.children {
		if err := c.waitAnswer(ctx); err != nil {
			return nil, errors.Join(err, p.Stop())
		}
	}
	cfg.Logger.Info("hollow processes started", "processes", n, "edges", len(ids))
	return p, nil
}

func (p *Procs) start(k int, ids []Identity, n int) (*child, error) {
	dir := filepath.Join(p.cfg.Dir, fmt.Sprintf("hollow-%d", k))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create the directory of child %d: %w", k, err)
	}
	idFile := filepath.Join(dir, "identities.json")
	if err := WriteIdentities(idFile, p.cfg.CA, ids); err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "report.sock")
	args := []string{"run", "--identities", idFile, "--report-socket", sock, "--data-root", dir,
		"--rate", strconv.FormatFloat(p.cfg.Rate/float64(n), 'f', -1, 64)}
	for _, a := range p.cfg.Cloud {
		args = append(args, "--cloud", a)
	}
	if p.cfg.Namespace != "" {
		args = append(args, "--namespace", p.cfg.Namespace)
	}
	if p.cfg.ConfigMap != "" {
		args = append(args, "--configmap", p.cfg.ConfigMap)
	}
	for flag, d := range map[string]time.Duration{
		"--lease-duration": p.cfg.LeaseDuration, "--status-every": p.cfg.StatusEvery,
		"--backoff-min": p.cfg.Backoff.Min, "--backoff-max": p.cfg.Backoff.Max,
		"--keepalive": p.cfg.KeepAlive, "--dead-peer-timeout": p.cfg.DeadPeerTimeout,
	} {
		if d > 0 {
			args = append(args, flag, d.String())
		}
	}
	logPath := filepath.Join(p.cfg.Dir, fmt.Sprintf("hollow-%d.log", k))
	log, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create the log of child %d: %w", k, err)
	}
	defer log.Close()
	cmd := exec.Command(p.cfg.Binary, args...)
	if p.cfg.Nice > 0 {
		// nice(1) execs the child in its own process, so every thread
		// the Go runtime starts inherits the niceness.
		cmd = exec.Command("nice", append([]string{"-n", strconv.Itoa(p.cfg.Nice), p.cfg.Binary}, args...)...)
	}
	if p.cfg.GOMAXPROCS > 0 {
		cmd.Env = append(os.Environ(), "GOMAXPROCS="+strconv.Itoa(p.cfg.GOMAXPROCS))
	}
	cmd.Stdout, cmd.Stderr = log, log
	// A child never outlives the scale run.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start child %d: %w", k, err)
	}
	c := &child{k: k, edges: len(ids), cmd: cmd, log: logPath, exited: make(chan struct{}), client: &http.Client{
		Timeout: time.Minute,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}}
	go func() {
		err := cmd.Wait()
		c.mu.Lock()
		c.err = err
		c.mu.Unlock()
		close(c.exited)
	}()
	return c, nil
}

// waitAnswer polls the child's socket until it answers (bounded at two
// minutes: a child reads its identities and opens its socket first).
func (c *child) waitAnswer(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := c.report(ctx, Query{}); err == nil {
			return nil
		}
		select {
		case <-c.exited:
			return c.exitError()
		case <-ctx.Done():
			return fmt.Errorf("wait for hollow child %d to answer: %w", c.k, ctx.Err())
		case <-tick.C:
		}
	}
}

func (c *child) exitError() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		return fmt.Errorf("hollow child %d exited; see %s", c.k, c.log)
	}
	return fmt.Errorf("hollow child %d exited: %w; see %s", c.k, c.err, c.log)
}

func (c *child) report(ctx context.Context, q Query) (Report, error) {
	select {
	case <-c.exited:
		return Report{}, c.exitError()
	default:
	}
	body, err := json.Marshal(q)
	if err != nil {
		return Report{}, fmt.Errorf("encode query: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://hollow/report", bytes.NewReader(body))
	if err != nil {
		return Report{}, fmt.Errorf("build report request: %w", err)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return Report{}, fmt.Errorf("ask hollow child %d: %w", c.k, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return Report{}, fmt.Errorf("ask hollow child %d: %s", c.k, resp.Status)
	}
	var r Report
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return Report{}, fmt.Errorf("decode the report of hollow child %d: %w", c.k, err)
	}
	return r, nil
}

// Processes is how many children run the edges.
func (p *Procs) Processes() int { return len(p.children) }

// Pids are the children's process ids, in order (for perf and for
// killing one in a test).
func (p *Procs) Pids() []int {
	pids := make([]int, len(p.children))
	for i, c := range p.children {
		pids[i] = c.cmd.Process.Pid
	}
	return pids
}

// Report asks every child and adds their reports up; a child that does
// not answer (or exited) fails it.
func (p *Procs) Report(ctx context.Context, q Query) (Report, error) {
	reps := make([]Report, len(p.children))
	g, gctx := errgroup.WithContext(ctx)
	for i, c := range p.children {
		g.Go(func() error {
			r, err := c.report(gctx, q)
			reps[i] = r
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return Report{}, err
	}
	var total Report
	for _, r := range reps {
		total.Add(r)
	}
	return total, nil
}

// Stop ends the children with SIGTERM (SIGKILL after 30 s) and waits for
// them; an error says which did not end cleanly.
func (p *Procs) Stop() error {
	for _, c := range p.children {
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
	}
	var errs []error
	for _, c := range p.children {
		select {
		case <-c.exited:
		case <-time.After(30 * time.Second):
			_ = c.cmd.Process.Kill()
			<-c.exited
		}
		c.mu.Lock()
		if c.err != nil {
			errs = append(errs, fmt.Errorf("hollow child %d: %w; see %s", c.k, c.err, c.log))
		}
		c.mu.Unlock()
	}
	p.children = nil
	return errors.Join(errs...)
}
