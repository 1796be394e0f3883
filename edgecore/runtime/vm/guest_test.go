package vm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

// The marker is found once it is complete, also when QEMU wrote it in two
// pieces between two reads.
func TestMarkerScanner(t *testing.T) {
	var sc markerScanner
	require.False(t, sc.feed(nil))
	require.False(t, sc.feed([]byte("Linux version 6.1\r\nTETHER-GUEST-")))
	require.True(t, sc.feed([]byte("BOOTED\r\n")), "split across two reads")
	sc = markerScanner{}
	require.False(t, sc.feed([]byte("TETHER-GUEST-BOOT")))
	require.False(t, sc.feed([]byte("ING\n")))
	require.True(t, sc.feed([]byte("x TETHER-GUEST-BOOTED")))
}

func TestConsoleTail(t *testing.T) {
	var lines []string
	for i := range 30 {
		lines = append(lines, "line "+strings.Repeat("x", i))
	}
	got := tail([]byte(strings.Join(lines, "\r\n")+"\r\n"), false)
	require.Equal(t, strings.Join(lines[10:], "\n"), got, "the last 20 lines, carriage returns gone")

	got = tail([]byte("a\x1b[1mbold\x1b[0m\x00\xff\xfe\tz\n"), false)
	require.Equal(t, "a[1mbold[0m\tz", got, "control bytes and invalid UTF-8 dropped")

	long := strings.Repeat("é", 3000) // 6000 bytes, one line
	got = tail([]byte(long), false)
	require.LessOrEqual(t, len(got), ConsoleBytes)
	require.True(t, utf8.ValidString(got))
	require.NotEmpty(t, got)

	got = tail([]byte("partial line\nwhole\n"), true)
	require.Equal(t, "whole", got, "a cut start drops its partial first line")

	path := filepath.Join(t.TempDir(), "console.log")
	require.NoError(t, os.WriteFile(path, []byte(strings.Repeat("0123456789\n", 5000)), 0o644))
	got = consoleTail(path)
	require.Equal(t, ConsoleLines, strings.Count(got, "\n")+1)
	require.Empty(t, consoleTail(filepath.Join(t.TempDir(), "missing")))
}

// FuzzConsoleTail: whatever the guest prints, the tail is valid UTF-8 of
// at most ConsoleLines lines and ConsoleBytes bytes, without control
// characters but newline and tab.
func FuzzConsoleTail(f *testing.F) {
	f.Add([]byte("TETHER-GUEST-BOOTED\r\n"), false)
	f.Add([]byte("\x1b[2J\xff\xfe\x00"), true)
	f.Fuzz(func(t *testing.T, raw []byte, cut bool) {
		got := tail(raw, cut)
		require.True(t, utf8.ValidString(got))
		require.LessOrEqual(t, len(got), ConsoleBytes)
		require.LessOrEqual(t, strings.Count(got, "\n"), ConsoleLines-1)
		for _, r := range got {
			require.False(t, r < 0x20 && r != '\n' && r != '\t', "control character %q", r)
		}
	})
}
