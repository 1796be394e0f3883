package vm

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func texts(entries []logEntry) []string {
	var out []string
	for _, e := range entries {
		tag := "F "
		if e.partial {
			tag = "P "
		}
		out = append(out, tag+string(e.text))
	}
	return out
}

func TestSplitConsole(t *testing.T) {
	for _, tc := range []struct {
		name string
		raw  string
		max  int
		mode splitMode
		want []string
		n    int
	}{
		{name: "empty", raw: "", max: 8, want: nil, n: 0},
		{name: "lines with crlf", raw: "ab\r\ncd\n", max: 8, want: []string{"F ab", "F cd"}, n: 7},
		{name: "empty line", raw: "\r\n\n", max: 8, want: []string{"F ", "F "}, n: 3},
		{name: "unfinished held", raw: "ab\ncd", max: 8, want: []string{"F ab"}, n: 3},
		{name: "long line split", raw: "0123456789\n", max: 4, want: []string{"P 0123", "P 4567", "F 89"}, n: 11},
		{name: "exactly max", raw: "0123\n", max: 4, want: []string{"F 0123"}, n: 5},
		{name: "exactly max with cr", raw: "0123\r\n", max: 4, want: []string{"F 0123"}, n: 6},
		{name: "long unfinished cut", raw: "0123456789", max: 4, want: []string{"P 0123", "P 4567"}, n: 8},
		{name: "unfinished of max held", raw: "0123", max: 4, want: nil, n: 0},
		{name: "partial flush", raw: "a\nlogin: ", max: 8, mode: flushPartial, want: []string{"F a", "P login: "}, n: 9},
		{name: "partial flush holds cr", raw: "abc\r", max: 8, mode: flushPartial, want: []string{"P abc"}, n: 3},
		{name: "partial flush of a cr", raw: "\r", max: 8, mode: flushPartial, want: nil, n: 0},
		{name: "final", raw: "a\nb\r", max: 8, mode: flushFinal, want: []string{"F a", "F b"}, n: 4},
		{name: "inner cr kept", raw: "50%\r100%\r\n", max: 16, want: []string{"F 50%\r100%"}, n: 10},
		{name: "cr cr lf", raw: "x\r\r\n", max: 16, want: []string{"F x\r"}, n: 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			entries, n := splitConsole([]byte(tc.raw), tc.max, tc.mode)
			require.Equal(t, tc.want, texts(entries))
			require.Equal(t, tc.n, n)
		})
	}
}

// FuzzSplitConsole: whatever the guest prints, in however many pieces,
// the entries joined are exactly its lines, each entry at most max bytes
// without a newline, and what is held is less than a line.
func FuzzSplitConsole(f *testing.F) {
	f.Add([]byte("Linux version\r\nTETHER-GUEST-BOOTED\r\n"), uint8(5), uint8(16), uint8(0))
	f.Add([]byte("\r\r\n\n\x00\xff login: "), uint8(1), uint8(2), uint8(1))
	f.Add(bytes.Repeat([]byte("x"), 100), uint8(7), uint8(3), uint8(2))
	f.Fuzz(func(t *testing.T, raw []byte, cut, max, mode uint8) {
		m := int(max%32) + 1
		// Two calls, as two reads: the first holds, the second in mode.
		first := raw[:int(cut)%(len(raw)+1)]
		e1, n1 := splitConsole(first, m, holdPartial)
		held := append(append([]byte(nil), first[n1:]...), raw[len(first):]...)
		md := splitMode(mode % 3)
		e2, n2 := splitConsole(held, m, md)
		var joined []byte
		for _, e := range append(e1, e2...) {
			require.LessOrEqual(t, len(e.text), m)
			require.NotContains(t, string(e.text), "\n")
			joined = append(joined, e.text...)
			if !e.partial {
				joined = append(joined, '\n')
			}
		}
		consumed := n1 + n2
		rest := raw[consumed:]
		switch md {
		case holdPartial:
			require.NotContains(t, string(rest), "\n")
			require.LessOrEqual(t, len(rest), m)
		case flushPartial:
			require.LessOrEqual(t, len(rest), 1)
		case flushFinal:
			require.Empty(t, rest)
		}
		// The reference: the consumed bytes' lines, the unfinished end
		// (flushed) as it is, but a last '\r'.
		want := []byte(strings.Join(RawLines(raw[:consumed]), "\n"))
		if len(RawLines(raw[:consumed])) > 0 {
			want = append(want, '\n')
		}
		if i := bytes.LastIndexByte(raw[:consumed], '\n'); i+1 < consumed {
			tail := raw[i+1 : consumed]
			if md == flushFinal && consumed == len(raw) {
				tail = bytes.TrimSuffix(tail, []byte("\r"))
				want = append(append(want, tail...), '\n')
			} else {
				want = append(want, tail...)
			}
		}
		require.Equal(t, string(want), string(joined))
	})
}

// console is a converter on files in a temp dir, with the raw file QEMU
// would append to.
type testConsole struct {
	t               *testing.T
	raw, log, state string
	rawF            *os.File
	keep            int64
}

func newTestConsole(t *testing.T, keep int64) *testConsole {
	dir := t.TempDir()
	tc := &testConsole{t: t, raw: filepath.Join(dir, "console-c.raw"), log: filepath.Join(dir, "logs", "c_0.log"), keep: keep}
	tc.state = consoleStatePath(tc.raw)
	require.NoError(t, os.MkdirAll(filepath.Dir(tc.log), 0o755))
	f, err := os.OpenFile(tc.raw, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	tc.rawF = f
	return tc
}

// guest appends s to the raw file, as QEMU does.
func (tc *testConsole) guest(s string) {
	_, err := tc.rawF.WriteString(s)
	require.NoError(tc.t, err)
}

func (tc *testConsole) open() *consoleLog {
	l, err := openConsole(tc.raw, tc.log, tc.state, tc.keep)
	require.NoError(tc.t, err)
	return l
}

// pump reads and converts everything there is.
func pumpAll(t *testing.T, l *consoleLog, now time.Time, final bool) {
	for {
		chunk, err := l.read(now)
		require.NoError(t, err)
		require.NoError(t, l.flush(now, final))
		if len(chunk) < consoleReadMax {
			return
		}
	}
}

func (tc *testConsole) lines() []string {
	lines, err := CRILines(tc.log)
	require.NoError(tc.t, err)
	return lines
}

// A restart between writing entries to the log and recording them in the
// state (the converter killed there: the entries are in the log, the state
// is the one before) neither loses nor duplicates a line: the log is cut
// back to the recorded size and the entries are written again. Without the
// cut, the lines are there twice (the test failed so before the recovery
// was written).
func TestConsoleRestartBetweenLogAndState(t *testing.T) {
	tc := newTestConsole(t, consoleRawKeep)
	now := time.Unix(1700000000, 5)
	tc.guest("one\r\ntwo\r\n")
	l := tc.open()
	pumpAll(t, l, now, false)
	require.Equal(t, []string{"one", "two"}, tc.lines())

	// The guest prints on; the converter reads and writes the entries, and
	// is killed before its state write.
	tc.guest("three\r\nfour\r\nfi")
	chunk, err := l.read(now)
	require.NoError(t, err)
	require.Equal(t, "three\r\nfour\r\nfi", string(chunk))
	entries, _ := splitConsole(l.pending, MaxLogLine, holdPartial)
	var buf []byte
	for _, e := range entries {
		buf = appendEntry(buf, now, e)
	}
	_, err = l.log.Write(buf)
	require.NoError(t, err)
	require.NoError(t, l.close(false))
	require.Equal(t, []string{"one", "two", "three", "four"}, tc.lines(), "the entries reached the log")

	// While it is down, the guest finishes the line and prints more.
	tc.guest("ve\r\nsix\r\n")
	l = tc.open()
	require.Equal(t, []string{"one", "two"}, tc.lines(), "cut back to the recorded size")
	pumpAll(t, l, now, false)
	require.Equal(t, []string{"one", "two", "three", "four", "five", "six"}, tc.lines())
	require.NoError(t, l.close(true))

	// A restart right after a state write changes nothing.
	l = tc.open()
	pumpAll(t, l, now, false)
	require.NoError(t, l.close(false))
	require.Equal(t, []string{"one", "two", "three", "four", "five", "six"}, tc.lines())
}

// A torn state write (a power loss in the middle of it) leaves the other
// slot: the converter resumes from the state before.
func TestConsoleTornState(t *testing.T) {
	tc := newTestConsole(t, consoleRawKeep)
	now := time.Unix(1700000000, 0)
	tc.guest("a\n")
	l := tc.open()
	pumpAll(t, l, now, false)
	tc.guest("b\n")
	pumpAll(t, l, now, false)
	seq := l.st.seq
	require.NoError(t, l.close(false))
	// Tear the newest slot.
	f, err := os.OpenFile(tc.state, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{0xde, 0xad}, int64(seq%2)*stateSlot+20)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	l = tc.open()
	require.Equal(t, seq-1, l.st.seq)
	require.Equal(t, []string{"a"}, tc.lines(), "the log is cut to the older state")
	pumpAll(t, l, now, false)
	require.NoError(t, l.close(false))
	require.Equal(t, []string{"a", "b"}, tc.lines())

	// Both slots bad: converted again from the start, reported.
	require.NoError(t, os.WriteFile(tc.state, bytes.Repeat([]byte{1}, 2*stateSlot), 0o600))
	l2, err := openConsole(tc.raw, tc.log, tc.state, consoleRawKeep)
	require.ErrorIs(t, err, errStateCorrupt)
	require.NotNil(t, l2)
	require.NoError(t, l2.close(false))
}

// Long lines become P entries of MaxLogLine and an F; an unfinished line
// is held, written as P after PartialFlush, and the rest as F at the end.
func TestConsolePartialLines(t *testing.T) {
	tc := newTestConsole(t, consoleRawKeep)
	now := time.Unix(1700000000, 0)
	long := strings.Repeat("x", 2*MaxLogLine+10)
	tc.guest(long + "\r\nlogin: ")
	l := tc.open()
	pumpAll(t, l, now, false)
	data, err := os.ReadFile(tc.log)
	require.NoError(t, err)
	entries, err := ParseCRILog(data)
	require.NoError(t, err)
	require.Len(t, entries, 3)
	require.True(t, entries[0].Partial)
	require.Len(t, entries[0].Text, MaxLogLine)
	require.False(t, entries[2].Partial)
	require.Len(t, entries[2].Text, 10)
	require.Equal(t, []string{long}, tc.lines(), "the prompt is held")

	require.NoError(t, l.flush(now.Add(PartialFlush-time.Millisecond), false))
	require.Equal(t, []string{long}, tc.lines(), "held until PartialFlush")
	require.NoError(t, l.flush(now.Add(PartialFlush), false))
	require.Equal(t, []string{long, "login: …"}, tc.lines(), "written as P")
	tc.guest("root\r\nbye")
	_, err = l.read(now.Add(2 * PartialFlush))
	require.NoError(t, err)
	require.NoError(t, l.flush(now.Add(2*PartialFlush), true))
	require.NoError(t, l.close(true))
	require.Equal(t, []string{long, "login: root", "bye"}, tc.lines())
}

// ReopenContainerLog after the log was renamed: what follows goes to a new
// file at the path, nothing is lost or written twice across the two, and a
// restart after it does not cut the new file by the old one's size.
func TestConsoleReopen(t *testing.T) {
	tc := newTestConsole(t, consoleRawKeep)
	now := time.Unix(1700000000, 0)
	tc.guest("before\n")
	l := tc.open()
	pumpAll(t, l, now, false)
	rotated := tc.log + ".20261201-150000"
	require.NoError(t, os.Rename(tc.log, rotated))
	tc.guest("between\n")
	require.NoError(t, l.reopen())
	tc.guest("after\n")
	pumpAll(t, l, now, false)
	require.NoError(t, l.close(false))
	old, err := CRILines(rotated)
	require.NoError(t, err)
	require.Equal(t, []string{"before"}, old)
	require.Equal(t, []string{"between", "after"}, tc.lines())

	tc.guest("later\n")
	l = tc.open()
	pumpAll(t, l, now, false)
	require.NoError(t, l.close(false))
	require.Equal(t, []string{"between", "after", "later"}, tc.lines())
}

// The raw file's converted bytes are freed (a hole: its size stays, its
// blocks go) but the last consoleRawKeep, which the console tail reads.
func TestConsoleRawBounded(t *testing.T) {
	tc := newTestConsole(t, consoleRawKeep)
	now := time.Unix(1700000000, 0)
	l := tc.open()
	line := strings.Repeat("y", 99) + "\n"
	for i := range 200 {
		tc.guest(strings.Repeat(line, 50)) // 5000 bytes each
		pumpAll(t, l, now, false)
		if i == 0 {
			require.Equal(t, 50, len(tc.lines()))
		}
	}
	require.Len(t, tc.lines(), 200*50)
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(tc.raw, &st))
	require.Equal(t, int64(200*50*100), st.Size, "offsets stay")
	require.Less(t, st.Blocks*512, int64(64<<10), "1 MB converted, at most the kept end and a few pages allocated")
	require.Equal(t, tail(bytes.Repeat([]byte(line), 50), true), consoleTail(tc.raw), "the tail is intact")
	require.NoError(t, l.close(false))
}
