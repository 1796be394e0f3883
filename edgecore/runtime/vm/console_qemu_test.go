package vm_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qmp"
)

// criLines reads the CRI log at path (strictly: every line must be a CRI
// entry); a missing file is no lines.
func criLines(t *testing.T, path string) []string {
	t.Helper()
	lines, err := vm.CRILines(path)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	return lines
}

// matches reports whether the CRI log's lines are exactly the raw
// console's complete lines, with at most an unfinished last line more (a
// P entry, or held).
func matches(logLines []string, raw []byte) bool {
	want := vm.RawLines(raw)
	if len(logLines) < len(want) || len(logLines) > len(want)+1 {
		return false
	}
	return slices.Equal(logLines[:len(want)], want)
}

// The guest's console reaches the container's log path as CRI log entries,
// also across two restarts of the backend while the guest prints:
// every line QEMU wrote is in the log once, in order, none lost (the raw
// file is kept whole by NewKeepingConsole, to compare). The boot marker is
// seen once and recorded; after ReopenContainerLog (the log renamed) the
// powerdown line goes to the new file.
func TestConsoleAcrossRestarts(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	newBackend := func() *vm.Backend {
		b, err := vm.NewKeepingConsole(ctx, e.cfg, e.st.Allocations())
		require.NoError(t, err)
		return b
	}
	b := newBackend()
	sbCfg := e.sandbox("log", nil)
	sb, err := b.RunPodSandbox(ctx, sbCfg, "tether-vm")
	require.NoError(t, err)
	cfg := compute("compute")
	id, err := b.CreateContainer(ctx, sb, cfg, sbCfg)
	require.NoError(t, err)
	require.NoError(t, b.StartContainer(ctx, id))
	logPath := filepath.Join(sbCfg.LogDirectory, cfg.LogPath)
	raw := vm.RawConsolePath(filepath.Join(e.cfg.RunDir, sb), id)
	readRaw := func() []byte {
		data, err := os.ReadFile(raw)
		require.NoError(t, err)
		return data
	}

	require.Eventually(t, func() bool {
		return slices.Contains(criLines(t, logPath), vm.BootMarker)
	}, 4*time.Minute, 50*time.Millisecond, "the boot marker in the CRI log")
	// The test guest prints nothing more once booted; while the backend
	// is down, the test makes the guest's kernel print (SysRq help, through
	// QMP's send-key: one line each, longer than 200 bytes).
	qmpSock := filepath.Join(e.cfg.RunDir, sb, "qmp.sock")
	helps := 0 // help texts the guest printed while the backend was down
	for restart := range 2 {
		require.NoError(t, b.Close(ctx))
		converted := criLines(t, logPath)
		before := len(vm.RawLines(readRaw()))
		helps += sysrqHelp(t, qmpSock, raw, 3)
		require.Eventually(t, func() bool { return len(vm.RawLines(readRaw())) >= before+3 },
			time.Minute, 20*time.Millisecond, "restart %d: the guest's lines are complete", restart)
		require.Equal(t, converted, criLines(t, logPath), "nothing converts while the backend is down")
		b = newBackend()
	}
	t.Cleanup(func() { require.NoError(t, b.Close(ctx)) })
	require.Eventually(t, func() bool { return matches(criLines(t, logPath), readRaw()) },
		30*time.Second, 50*time.Millisecond, "the CRI log is the raw console, line for line")
	lines := criLines(t, logPath)
	count, help := 0, 0
	for _, l := range lines {
		if strings.Contains(l, vm.BootMarker) {
			count++
		}
		if strings.Contains(l, "sysrq: HELP") {
			help++
		}
	}
	require.Equal(t, 1, count, "the marker once")
	require.GreaterOrEqual(t, helps, 6)
	require.Equal(t, helps, help, "each line printed while the backend was down, once")
	require.Eventually(t, func() bool {
		resp, err := b.ContainerStatus(ctx, id, true)
		require.NoError(t, err)
		gi := guestOf(t, resp)
		return gi.BootedAt != "" && strings.Contains(gi.Console, vm.BootMarker)
	}, 30*time.Second, 20*time.Millisecond, "the boot recorded, the tail from the console")

	// Log rotation: renamed, reopened; the powerdown goes to the new file.
	rotated := logPath + ".1"
	require.NoError(t, os.Rename(logPath, rotated))
	require.NoError(t, b.ReopenContainerLog(ctx, id))
	require.NoError(t, b.StopContainer(ctx, id, 60))
	resp, err := b.ContainerStatus(ctx, id, true)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, resp.GetStatus().GetState())
	require.Contains(t, criLines(t, logPath), "TETHER-GUEST-POWERDOWN", "after the reopen, in the new file")
	require.NotContains(t, criLines(t, rotated), "TETHER-GUEST-POWERDOWN")
	all := append(criLines(t, rotated), criLines(t, logPath)...)
	require.True(t, matches(all, readRaw()), "the two files together are the console")
	require.Contains(t, guestOf(t, resp).Console, "TETHER-GUEST-POWERDOWN")
	require.Equal(t, codes.FailedPrecondition, status.Code(b.ReopenContainerLog(ctx, id)), "not running")

	require.NoError(t, b.RemoveContainer(ctx, id))
	_, err = os.Stat(raw)
	require.True(t, os.IsNotExist(err), "the raw console goes with the container")
	require.NoError(t, b.RemovePodSandbox(ctx, sb))
}

// sysrqHelp makes the guest's kernel print its SysRq help at least n
// times: Alt+SysRq+H through QMP's send-key, on a connection of the
// test's own (only while the backend holds none: QEMU serves one QMP
// client), one press after the other's line is in the raw console. A
// press the guest does not answer within 15 s (a key event lost by the
// emulated keyboard on a loaded machine) is made again. It returns how
// many help texts the guest printed, late answers included.
func sysrqHelp(t *testing.T, sock, raw string, n int) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	c, err := qmp.Dial(ctx, sock, qmp.Config{})
	require.NoError(t, err)
	defer c.Close()
	type key struct {
		Type string `json:"type"`
		Data string `json:"data"`
	}
	helps := func() int {
		data, err := os.ReadFile(raw)
		require.NoError(t, err)
		return strings.Count(string(data), "sysrq: HELP")
	}
	start := helps()
	for range n {
		before := helps()
		answered := false
		for try := 0; try < 4 && !answered; try++ {
			require.NoError(t, c.Execute(ctx, "send-key", map[string]any{
				"keys": []key{{"qcode", "alt"}, {"qcode", "sysrq"}, {"qcode", "h"}},
			}, nil))
			deadline := time.Now().Add(15 * time.Second)
			for !answered && time.Now().Before(deadline) {
				answered = helps() > before
				if !answered {
					time.Sleep(20 * time.Millisecond)
				}
			}
		}
		require.True(t, answered, "the guest printed the SysRq help")
	}
	// A late answer to a repeated press still arrives: count after the
	// console has been quiet for a second.
	last, quiet := helps(), time.Now()
	for time.Since(quiet) < time.Second {
		time.Sleep(50 * time.Millisecond)
		if h := helps(); h != last {
			last, quiet = h, time.Now()
		}
	}
	return last - start
}
