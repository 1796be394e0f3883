//go:build unix

package store

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/tests/testlog"
)

// The kill -9 test: a child process (this test binary, running only
// TestCrashChild) applies batches in a loop and reports each committed one
// on stdout; the parent kills it with SIGKILL at a random moment, reopens
// the file and checks that every reported batch is there in full and that
// no batch is there in part. It repeats on the same file, so recovery of a
// file left by a killed process is exercised too.
const (
	crashEnvPath = "TETHER_STORE_CRASH_DB"
	crashEnvRun  = "TETHER_STORE_CRASH_RUN"
	crashBatch   = 50
	crashKills   = 5
	// crashChildLimit stops a child the parent failed to kill.
	crashChildLimit = 15 * time.Second
	// crashMaxDelay bounds the random time between the child's first
	// committed batch and the kill.
	crashMaxDelay = 250 * time.Millisecond
)

// crashRecord is the Data of every object the child writes.
type crashRecord struct {
	Run   int `json:"run"`
	Batch int `json:"batch"`
	Index int `json:"index"`
}

func crashObject(run, batch, index int) Object {
	return Object{
		Resource: message.Resource{
			Version:   "v1",
			Kind:      "ConfigMap",
			Namespace: fmt.Sprintf("run-%d", run),
			Name:      fmt.Sprintf("b%d-o%d", batch, index),
			UID:       fmt.Sprintf("uid-%d-%d-%d", run, batch, index),
		},
		Version: strconv.Itoa(batch),
		Data: fmt.Appendf(nil, `{"run":%d,"batch":%d,"index":%d,"pad":%q}`,
			run, batch, index, strings.Repeat("x", 200)),
	}
}

func crashSandbox(run, batch int) string { return fmt.Sprintf("sb-%d-%d", run, batch) }

// TestCrashChild is the child process of TestKill9. It does nothing unless
// TestKill9 started it.
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashEnvPath)
	if path == "" {
		t.Skip("helper process of TestKill9")
	}
	run, err := strconv.Atoi(os.Getenv(crashEnvRun))
	require.NoError(t, err)
	ctx := t.Context()
	s, err := Open(ctx, path, nil)
	require.NoError(t, err)
	defer s.Close()

	deadline := time.Now().Add(crashChildLimit)
	for batch := 1; time.Now().Before(deadline); batch++ {
		changes := make([]Change, crashBatch)
		for i := range changes {
			changes[i] = upsert(crashObject(run, batch, i))
		}
		require.NoError(t, s.Apply(ctx, changes))
		// And a runtime id row, committed with synchronous=NORMAL: it must
		// survive the kill as well.
		require.NoError(t, s.RuntimeIDs().PutSandbox(ctx, crashSandbox(run, batch), "containerd"))
		// os.Stdout is unbuffered: the line is in the pipe when this returns.
		_, err := fmt.Fprintf(os.Stdout, "committed %d\n", batch)
		require.NoError(t, err)
	}
}

func TestKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	path := filepath.Join(t.TempDir(), "crash.db")
	committed := map[int]int{} // run: last batch the child reported
	for run := 1; run <= crashKills; run++ {
		committed[run] = runAndKill(t, path, run)
		verifyCrashRuns(t, path, committed)
	}
	t.Logf("batches reported per run: %v", committed)
}

// runAndKill runs one child until a random moment after its first commit,
// kills it with SIGKILL and returns the last batch it reported.
func runAndKill(t *testing.T, path string, run int) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), crashChildLimit)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashEnvPath+"="+path, crashEnvRun+"="+strconv.Itoa(run))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())

	// Lines are read until EOF, that is until the child is dead, so the
	// ones still in the pipe when it was killed count too.
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			case <-ctx.Done(): // the test failed and returned
				return
			}
		}
	}()

	var (
		last    int
		other   []string
		kill    <-chan time.Time // armed by the first committed batch
		killed  bool
		timeout = time.After(crashChildLimit)
	)
	for done := false; !done; {
		select {
		case line, ok := <-lines:
			if !ok {
				done = true
				break
			}
			n, isCommit := strings.CutPrefix(line, "committed ")
			batch, err := strconv.Atoi(n)
			if !isCommit || err != nil {
				other = append(other, line)
				break
			}
			require.Equal(t, last+1, batch, "batches are reported in order")
			last = batch
			if kill == nil && !killed {
				kill = time.After(rand.N(crashMaxDelay))
			}
		case <-kill:
			require.NoError(t, cmd.Process.Kill())
			killed, kill = true, nil
		case <-timeout:
			_ = cmd.Process.Kill()
			for range lines {
				// Drain until the child is gone and the reader has returned.
			}
			_ = cmd.Wait() // stderr is complete only after Wait
			t.Fatalf("child did not commit and get killed in %v\nstdout: %q\nstderr: %s", crashChildLimit, other, stderr.String())
		}
	}
	waitErr := cmd.Wait()
	require.True(t, killed, "child ended by itself: %v\nstdout: %q\nstderr: %s", waitErr, other, stderr.String())
	var exitErr *exec.ExitError
	require.True(t, errors.As(waitErr, &exitErr), "wait: %v", waitErr)
	status, ok := exitErr.Sys().(syscall.WaitStatus)
	require.True(t, ok)
	require.Equal(t, syscall.SIGKILL, status.Signal(), "stderr: %s", stderr.String())
	require.Positive(t, last)
	return last
}

// verifyCrashRuns reopens the file and checks every run so far: each batch
// is present with all its objects or absent, every reported batch is
// present, and at most the one batch in flight at the kill is present
// without having been reported.
func verifyCrashRuns(t *testing.T, path string, committed map[int]int) {
	t.Helper()
	ctx := t.Context()
	s, err := Open(ctx, path, testlog.New())
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	require.Equal(t, "ok", pragma(t, s.w, "integrity_check"))

	total := 0
	for run, last := range committed {
		objs, err := s.List(ctx, "ConfigMap", fmt.Sprintf("run-%d", run))
		require.NoError(t, err)
		perBatch := map[int]int{}
		for _, o := range objs {
			var rec crashRecord
			require.NoError(t, json.Unmarshal(o.Data, &rec))
			require.Equal(t, crashObject(run, rec.Batch, rec.Index), o, "object matches its data")
			perBatch[rec.Batch]++
		}
		for batch, n := range perBatch {
			require.Equal(t, crashBatch, n, "run %d batch %d is partially present", run, batch)
			require.LessOrEqual(t, batch, last+1, "run %d batch %d present, only %d reported", run, batch, last)
		}
		for batch := 1; batch <= last; batch++ {
			require.Contains(t, perBatch, batch, "run %d batch %d was reported committed but is missing", run, batch)
			_, ok, err := s.RuntimeIDs().Lookup(ctx, crashSandbox(run, batch))
			require.NoError(t, err)
			require.True(t, ok, "run %d batch %d: its runtime id was reported committed but is missing", run, batch)
		}
		total += len(objs)
	}
	n, err := s.Count(ctx)
	require.NoError(t, err)
	require.Equal(t, total, n)
}
