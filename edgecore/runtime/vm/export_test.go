package vm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"time"
)

// NewKeepingConsole is New with raw console files that keep everything
// converted, so a test can compare the CRI log with what QEMU wrote.
func NewKeepingConsole(ctx context.Context, cfg Config, allocs Allocations) (*Backend, error) {
	return newBackend(ctx, cfg, allocs, -1)
}

// CRIEntry is one entry of a CRI log.
type CRIEntry struct {
	At      time.Time
	Partial bool
	Text    string
}

// ParseCRILog reads a CRI log strictly, as kubelet's parser does: every
// line "RFC3339NANO stdout F|P TEXT". It is the tests' own reading of the
// format, not the converter's code.
func ParseCRILog(data []byte) ([]CRIEntry, error) {
	var out []CRIEntry
	if len(data) > 0 && data[len(data)-1] != '\n' {
		return nil, fmt.Errorf("the log does not end with a newline")
	}
	for i, line := range bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n")) {
		if len(data) == 0 {
			break
		}
		f := bytes.SplitN(line, []byte(" "), 4)
		if len(f) != 4 {
			return nil, fmt.Errorf("line %d %q: want 4 fields", i+1, line)
		}
		at, err := time.Parse(time.RFC3339Nano, string(f[0]))
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", i+1, err)
		}
		if string(f[1]) != "stdout" {
			return nil, fmt.Errorf("line %d: stream %q", i+1, f[1])
		}
		if string(f[2]) != "F" && string(f[2]) != "P" {
			return nil, fmt.Errorf("line %d: tag %q", i+1, f[2])
		}
		out = append(out, CRIEntry{At: at, Partial: string(f[2]) == "P", Text: string(f[3])})
	}
	return out, nil
}

// CRILines reads the CRI log at path and joins its P entries to their F
// entry, as a reader does: the guest's lines. A last P entry without its F
// is a line of its own, marked by a trailing "…".
func CRILines(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	entries, err := ParseCRILog(data)
	if err != nil {
		return nil, err
	}
	var lines []string
	var cur string
	open := false
	for _, e := range entries {
		cur += e.Text
		open = e.Partial
		if !e.Partial {
			lines = append(lines, cur)
			cur = ""
		}
	}
	if open {
		lines = append(lines, cur+"…")
	}
	return lines, nil
}

// RawLines are the guest's complete lines in raw console bytes, as the
// converter should write them: split at '\n', one '\r' before it dropped;
// what follows the last newline is left out.
func RawLines(raw []byte) []string {
	var lines []string
	for {
		i := bytes.IndexByte(raw, '\n')
		if i < 0 {
			return lines
		}
		lines = append(lines, string(bytes.TrimSuffix(raw[:i], []byte("\r"))))
		raw = raw[i+1:]
	}
}

// RawConsolePath is the raw console file of container id in the sandbox
// directory dir.
func RawConsolePath(dir, id string) string { return rawConsolePath(dir, id) }
