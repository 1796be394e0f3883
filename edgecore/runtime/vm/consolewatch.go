package vm

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tetheredge/tether/edgecore/cri"
)

// How the backend runs each container's console converter (console.go):
// the watcher of a running QEMU opens it, pumps it every ConsolePoll (the
// boot marker is looked for in what is read before it is converted, and the
// boot recorded first, so a restart can never have converted the marker
// without having recorded the boot), pumps the rest at QEMU's exit and
// closes it. A QEMU found gone at adoption has its console pumped to the
// end before its exit is recorded.

// rawConsolePath is the raw console file of container id in the sandbox
// directory dir.
func rawConsolePath(dir, id string) string { return filepath.Join(dir, "console-"+id+".raw") }

// consoleStatePath is the converter's state file beside raw.
func consoleStatePath(raw string) string { return strings.TrimSuffix(raw, ".raw") + ".state" }

// consoleWatch is a watcher's hold on its container's console.
type consoleWatch struct {
	b       *Backend
	v       *vmState
	c       *container
	started time.Time
	booted  bool
	marker  markerScanner
	log     *consoleLog // nil until opened
}

func (b *Backend) openConsoleLog(c *container) (*consoleLog, error) {
	raw := c.Spec.SerialLog
	l, err := openConsole(raw, c.LogPath, consoleStatePath(raw), b.consoleKeep)
	if errors.Is(err, errStateCorrupt) {
		b.consoleFailed(c, "state", err)
		err = nil
	}
	return l, err
}

// pump converts what is new; final: everything, QEMU has exited. Failures
// are counted and logged (rate-limited); the next pump tries again.
func (w *consoleWatch) pump(final bool) {
	if w.log == nil {
		l, err := w.b.openConsoleLog(w.c)
		if err != nil {
			w.b.consoleFailed(w.c, "open", err)
			return
		}
		w.log = l
		w.v.mu.Lock()
		w.v.console = l
		w.v.mu.Unlock()
	}
	for {
		chunk, err := w.log.read(time.Now())
		if err != nil {
			w.b.consoleFailed(w.c, "read", err)
			return
		}
		if !w.booted && w.marker.feed(chunk) {
			w.booted = true
			w.b.guestBooted(w.v, w.c, w.started)
		}
		if err := w.log.flush(time.Now(), final); err != nil {
			op := "write"
			if errors.Is(err, errPunch) {
				op = "punch"
			}
			w.b.consoleFailed(w.c, op, err)
			if op == "write" {
				return
			}
		}
		if len(chunk) < consoleReadMax {
			return
		}
	}
}

// close closes the converter; sync: the console has ended.
func (w *consoleWatch) close(sync bool) {
	if w.log == nil {
		return
	}
	w.v.mu.Lock()
	if w.v.console == w.log {
		w.v.console = nil
	}
	w.v.mu.Unlock()
	if err := w.log.close(sync); err != nil {
		w.b.consoleFailed(w.c, "close", err)
	}
	w.log = nil
}

// drainConsole converts the whole console of c, whose QEMU is gone.
func (b *Backend) drainConsole(v *vmState, c *container) {
	w := &consoleWatch{b: b, v: v, c: c, booted: true}
	w.pump(true)
	w.close(true)
}

// guestBooted records that c's guest printed the boot marker and reports it.
func (b *Backend) guestBooted(v *vmState, c *container, started time.Time) {
	now := time.Now()
	v.mu.Lock()
	c.BootedAt, c.Console = now.UnixNano(), consoleTail(c.Spec.SerialLog)
	v.mu.Unlock()
	b.m.boots.Observe(now.Sub(started).Seconds())
	if err := b.persistState(b.ctx, v); err != nil {
		b.logger.Warn("record vm boot failed", "container", c.ID, "err", err)
	}
	b.logger.Info("vm guest booted", "container", c.ID, "since_start", now.Sub(started))
	b.publish(cri.Event{ContainerID: c.ID, Kind: cri.EventStart, At: now})
}

func (b *Backend) consoleFailed(c *container, op string, err error) {
	b.m.console.WithLabelValues(op).Inc()
	if ok, suppressed := b.lim.Allow("console/" + op + "/" + c.ID); ok {
		b.logger.Warn("vm console conversion failed", "container", c.ID, "op", op, "err", err, "suppressed", suppressed)
	}
}

// removeConsole removes c's raw console and converter state (its CRI log
// stays, as the caller's).
func (b *Backend) removeConsole(c *container) {
	raw := c.Spec.SerialLog
	if raw == "" || raw == c.LogPath {
		return
	}
	for _, p := range []string{raw, consoleStatePath(raw)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			b.consoleFailed(c, "remove", err)
		}
	}
}

// ReopenContainerLog opens a running container's log path again, after
// the caller renamed the file (log rotation); the console goes on in the
// new file. A container that is not running is FailedPrecondition, as in
// containerd.
func (b *Backend) ReopenContainerLog(_ context.Context, id string) error {
	v, err := b.getContainer(id)
	if err != nil {
		return err
	}
	v.mu.Lock()
	c, l := v.rec.container(id), v.console
	running := c != nil && c == v.rec.live() && c.State == stateRunning
	v.mu.Unlock()
	if !running {
		return status.Errorf(codes.FailedPrecondition, "vm container %s is not running", id)
	}
	if l == nil {
		return status.Errorf(codes.Unavailable, "the console of vm container %s is not open yet", id)
	}
	if err := l.reopen(); err != nil {
		return status.Errorf(codes.Internal, "reopen the log of vm container %s: %v", id, err)
	}
	return nil
}
