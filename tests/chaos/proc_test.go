package chaos

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// proc is a child process (CloudCore or EdgeCore) that the test starts,
// kills with SIGKILL and starts again on the same state.
type proc struct {
	name string
	dir  string
	spec childSpec

	mu         sync.Mutex
	cmd        *exec.Cmd
	exited     chan struct{}
	killing    bool
	runs       int
	unexpected []string // exits the test did not cause
}

func newProc(t *testing.T, name, dir string, spec childSpec) *proc {
	p := &proc{name: name, dir: dir, spec: spec}
	t.Cleanup(p.kill)
	return p
}

func (p *proc) logPath() string { return filepath.Join(p.dir, p.name+".log") }

// appliedPath is the record of what run n of an edge applied.
func (p *proc) appliedPath(run int) string {
	return filepath.Join(p.dir, fmt.Sprintf("%s.applied.%d", p.name, run))
}

// start runs the child and waits until it is ready (listening, or with
// its store open).
func (p *proc) start() error {
	p.mu.Lock()
	p.runs++
	run := p.runs
	p.mu.Unlock()
	spec := p.spec
	if spec.Role == "edge" {
		spec.Applied = p.appliedPath(run)
	}
	spec.Ready = filepath.Join(p.dir, fmt.Sprintf("%s.ready.%d", p.name, run))
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	specPath := filepath.Join(p.dir, p.name+".spec.json")
	if err := os.WriteFile(specPath, b, 0o600); err != nil {
		return err
	}
	log, err := os.OpenFile(p.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	fmt.Fprintf(log, "=== chaos: %s run %d starts at %s\n", p.name, run, time.Now().Format(time.StampMilli))
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+specPath)
	cmd.Stdout, cmd.Stderr = log, log
	// A child never outlives the test binary, even if it dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	exited := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.exited = cmd, exited
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		if !p.killing {
			p.unexpected = append(p.unexpected, fmt.Sprintf("run %d exited on its own at %s: %v", run, time.Now().Format(time.StampMilli), err))
		}
		p.mu.Unlock()
		close(exited)
	}()
	deadline := time.After(60 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(spec.Ready); err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s run %d exited before it was ready; log %s:\n%s", p.name, run, p.logPath(), tail(p.logPath(), 30))
		case <-deadline:
			return fmt.Errorf("%s run %d not ready after 60s", p.name, run)
		case <-tick.C:
		}
	}
}

// kill sends SIGKILL and waits for the process to be gone. It does nothing
// when no process runs.
func (p *proc) kill() {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.cmd = nil
	p.killing = true
	p.mu.Unlock()
	if cmd != nil {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-exited
	}
	p.mu.Lock()
	p.killing = false
	p.mu.Unlock()
}

// problems returns the exits the test did not cause.
func (p *proc) problems() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.unexpected...)
}

// tail returns the last n lines of a file, for failure messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
