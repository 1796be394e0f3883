package qmp

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// startQEMU runs a real QEMU without a guest (-machine none): every QMP
// command of this package but query-cpus-fast's threads works on it, and
// stop/cont give STOP/RESUME events. Cleanup kills it.
func startQEMU(t *testing.T) (*exec.Cmd, string) {
	t.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	require.NoError(t, err, "qemu-system-x86_64 missing: run make runtime-deps")
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	cmd := exec.Command(bin, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		<-exited
	})
	return cmd, sock
}

// dial connects once QEMU's socket is there.
func dial(t *testing.T, sock string, cfg Config) *Client {
	t.Helper()
	var c *Client
	require.Eventually(t, func() bool {
		var err error
		c, err = Dial(t.Context(), sock, cfg)
		return err == nil
	}, 30*time.Second, 20*time.Millisecond, "qemu's qmp socket never answered")
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestCommands(t *testing.T) {
	_, sock := startQEMU(t)
	c := dial(t, sock, Config{})
	ctx := t.Context()

	st, err := c.QueryStatus(ctx)
	require.NoError(t, err)
	require.Equal(t, Status{Running: true, Status: "running"}, st)

	cpus, err := c.QueryCPUsFast(ctx)
	require.NoError(t, err)
	require.Empty(t, cpus, "-machine none has no vcpus")

	require.NoError(t, c.Stop(ctx))
	st, err = c.QueryStatus(ctx)
	require.NoError(t, err)
	require.Equal(t, Status{Running: false, Status: "paused"}, st)
	require.NoError(t, c.Cont(ctx))

	err = c.Execute(ctx, "no-such-command", nil, nil)
	var qe *Error
	require.ErrorAs(t, err, &qe)
	require.Equal(t, "CommandNotFound", qe.Class)

	// Arguments are sent: a query with a bad argument is refused by name.
	err = c.Execute(ctx, "query-status", map[string]any{"bogus": 1}, nil)
	require.ErrorAs(t, err, &qe)
	require.Contains(t, qe.Desc, "bogus")

	// The connection works after the refusals.
	_, err = c.QueryStatus(ctx)
	require.NoError(t, err)
}

// A reply that never comes (QEMU frozen with SIGSTOP) fails the command at
// its deadline; the connection stays usable: the late reply is dropped by
// id and the next command gets its own reply.
func TestDeadlineLateReplyDropped(t *testing.T) {
	cmd, sock := startQEMU(t)
	c := dial(t, sock, Config{})

	require.NoError(t, cmd.Process.Signal(syscall.SIGSTOP))
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	err := c.Stop(ctx) // would pause the vCPUs, and answer {}
	cancel()
	require.ErrorIs(t, err, context.DeadlineExceeded)

	require.NoError(t, cmd.Process.Signal(syscall.SIGCONT))
	// The next reply is query-status's own, not stop's late {}: a {}
	// decoded into Status would give Status "".
	st, err := c.QueryStatus(t.Context())
	require.NoError(t, err)
	require.Equal(t, "paused", st.Status, "the stop that timed out still ran")
	require.Equal(t, uint64(1), c.LateReplies())
}

// Events arrive while commands run, and a consumer that does not read
// never holds up a reply: with a buffer of 4, 100 stop/cont pairs all
// answer, the oldest events are dropped and counted, the newest kept.
func TestEventsNeverBlockReplies(t *testing.T) {
	_, sock := startQEMU(t)
	c := dial(t, sock, Config{EventBuffer: 4})
	ctx := t.Context()

	const pairs = 100
	for range pairs {
		require.NoError(t, c.Stop(ctx))
		require.NoError(t, c.Cont(ctx))
	}
	// Every event before the last reply has been read: 200 events, 4 kept.
	require.Equal(t, uint64(2*pairs-4), c.DroppedEvents())
	var names []string
	for range 4 {
		ev := <-c.Events()
		require.False(t, ev.At.IsZero())
		names = append(names, ev.Name)
	}
	require.Equal(t, []string{"STOP", "RESUME", "STOP", "RESUME"}, names)

	// While a reader drains, events and replies interleave freely.
	got := make(chan string, 2*pairs)
	go func() {
		for ev := range c.Events() {
			got <- ev.Name
		}
		close(got)
	}()
	require.NoError(t, c.Stop(ctx))
	require.Equal(t, "STOP", <-got)
	require.NoError(t, c.Cont(ctx))
	require.Equal(t, "RESUME", <-got)
	require.NoError(t, c.Close())
	_, open := <-got
	require.False(t, open, "events channel closes with the connection")
}

// Close fails a pending command with ErrClosed, joins the reader, and
// is idempotent; QEMU's exit closes the connection the same way.
func TestClose(t *testing.T) {
	cmd, sock := startQEMU(t)
	c := dial(t, sock, Config{})

	require.NoError(t, cmd.Process.Signal(syscall.SIGSTOP))
	errc := make(chan error, 1)
	go func() { errc <- c.Execute(context.Background(), "query-status", nil, nil) }()
	require.Eventually(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.pending) == 1
	}, 10*time.Second, 5*time.Millisecond)
	require.NoError(t, c.Close())
	require.ErrorIs(t, <-errc, ErrClosed)
	require.NoError(t, c.Close())
	require.ErrorIs(t, c.Execute(t.Context(), "query-status", nil, nil), ErrClosed)
	require.NoError(t, cmd.Process.Signal(syscall.SIGCONT))

	c2 := dial(t, sock, Config{})
	err := c2.Quit(t.Context())
	require.True(t, err == nil || errors.Is(err, ErrClosed), "quit: %v", err)
	var last string
	for ev := range c2.Events() { // closes when QEMU is gone
		last = ev.Name
	}
	require.Equal(t, "SHUTDOWN", last)
	<-c2.Done()
	require.ErrorIs(t, c2.Execute(t.Context(), "query-status", nil, nil), ErrClosed)
}

// Dial fails at its deadline on a socket that never greets.
func TestDialDeadline(t *testing.T) {
	cmd, sock := startQEMU(t)
	_ = dial(t, sock, Config{}) // the socket exists
	require.NoError(t, cmd.Process.Signal(syscall.SIGSTOP))
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, sock, Config{})
	require.ErrorIs(t, err, context.DeadlineExceeded)
}
