package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tetheredge/tether/tests/containerd"
)

// stopGrace is how long a daemon gets to stop on SIGTERM before SIGKILL.
const stopGrace = 30 * time.Second

// daemon is a child process of the quickstart (CloudCore, EdgeCore) whose
// output goes to a log file.
type daemon struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has exited
	err  error         // Wait's result, set before done is closed
}

// startDaemon starts bin with args, its output appended to logDir/name.log.
// The child dies with the quickstart (Pdeathsig) if the quickstart is
// killed outright.
func startDaemon(logDir, name, bin string, args ...string) (*daemon, error) {
	path := filepath.Join(logDir, name+".log")
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("create %s log: %w", name, err)
	}
	defer f.Close() // the child has its own descriptor
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, log: path, cmd: cmd, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		close(d.done)
	}()
	return d, nil
}

// exited reports whether the daemon has ended, and why, with the end of
// its log.
func (d *daemon) exited() error {
	select {
	case <-d.done:
		why := d.err
		if why == nil {
			why = errors.New("exit status 0")
		}
		return fmt.Errorf("%s exited: %w; last lines of %s:\n%s", d.name, why, d.log, containerd.Tail(d.log, 20))
	default:
		return nil
	}
}

// stop sends SIGTERM and waits, and SIGKILLs after stopGrace. A daemon that
// had already exited, or had to be killed, is an error.
func (d *daemon) stop() error {
	if err := d.exited(); err != nil {
		return err
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(stopGrace)
	defer timer.Stop()
	select {
	case <-d.done:
		return nil
	case <-timer.C:
		_ = d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("%s did not stop within %s of SIGTERM, killed; see %s", d.name, stopGrace, d.log)
	}
}

// runTool runs bin with args to completion and returns its standard
// output; a failure carries its standard error.
func runTool(ctx context.Context, env []string, bin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("run %s %s: %w: %s", filepath.Base(bin), args[0], err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), nil
}

// errStopped is returned when the quickstart was interrupted while
// starting.
var errStopped = errors.New("quickstart: interrupted")
