package qemu

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// lookPath resolves the QEMU binary.
func lookPath(binary string) (string, error) {
	p, err := exec.LookPath(binary)
	if err != nil {
		return "", fmt.Errorf("find qemu %q (apt-get install qemu-system-x86): %w", binary, err)
	}
	return p, nil
}

// tail returns the last n lines of a file, joined by " | ", for errors.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no output: " + err.Error() + ")"
	}
	lines := strings.Split(string(bytes.TrimSpace(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	if len(lines) == 1 && lines[0] == "" {
		return "(no output)"
	}
	return strings.Join(lines, " | ")
}
