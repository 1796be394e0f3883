package vm

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// What the backend learns of the guest from its serial console, and how it
// tells the pod manager.
//
// The console (ttyS0) is appended by QEMU to a raw file that the
// container's watcher converts into its CRI log (console.go). The watcher
// looks for BootMarker in what it reads, every ConsolePoll, before it
// converts it; the first time it sees it, the container's BootedAt is set
// (the time it was seen: up to one ConsolePoll late) and the console's
// tail is kept (from the raw file's end, which the converter keeps).
// ContainerStatus(verbose) hands both on in
// Info[InfoGuest]; the pod manager turns them into the pod conditions
// vm.edge.tether.dev/GuestBooted and vm.edge.tether.dev/Console. The tail
// is taken again only when the guest stops, so a chatty guest does not
// cause a status write per line.

// BootMarker is the line the guest prints on its console once booted
// (build/guest's init does).
const BootMarker = "TETHER-GUEST-BOOTED"

// InfoGuest is the key of ContainerStatus' verbose Info that carries
// GuestInfo as JSON.
const InfoGuest = "vm.edge.tether.dev/guest"

// Bounds of the console tail.
const (
	ConsoleLines = 20
	ConsoleBytes = 2 << 10
)

// GuestInfo is what Info[InfoGuest] holds.
type GuestInfo struct {
	// BootedAt is when the boot marker was seen, RFC 3339 with
	// nanoseconds; "" until then.
	BootedAt string `json:"bootedAt"`
	// Acceleration is "kvm" or "tcg".
	Acceleration string `json:"acceleration"`
	// Console is the last ConsoleLines lines (at most ConsoleBytes) of the
	// console at the last change of state.
	Console string `json:"console"`
}

func guestInfo(c *container) string {
	gi := GuestInfo{Acceleration: c.Spec.Accel, Console: c.Console}
	if c.BootedAt != 0 {
		gi.BootedAt = time.Unix(0, c.BootedAt).UTC().Format(time.RFC3339Nano)
	}
	data, _ := json.Marshal(gi) // strings only: always marshals
	return string(data)
}

// markerScanner finds BootMarker in a console read piece by piece.
type markerScanner struct {
	// carry is the end of the last piece that could be the start of the
	// marker.
	carry []byte
}

// feed reports whether the marker is in chunk (or was split between the
// last piece and chunk).
func (s *markerScanner) feed(chunk []byte) bool {
	if len(chunk) == 0 {
		return false
	}
	joined := append(s.carry, chunk...)
	if bytes.Contains(joined, []byte(BootMarker)) {
		return true
	}
	keep := min(len(joined), len(BootMarker)-1)
	s.carry = append(s.carry[:0], joined[len(joined)-keep:]...)
	return false
}

// consoleWindow is how much of the console's end consoleTail reads:
// enough that cleaning still leaves ConsoleBytes.
const consoleWindow = 4 * ConsoleBytes

// consoleTail returns the last ConsoleLines lines of the file at path, at
// most ConsoleBytes, as printable UTF-8 (control characters but newline
// and tab dropped, carriage returns too). A missing file is "".
func consoleTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return ""
	}
	start := max(info.Size()-consoleWindow, 0)
	buf := make([]byte, info.Size()-start)
	if _, err := f.ReadAt(buf, start); err != nil && !errors.Is(err, io.EOF) {
		return ""
	}
	return tail(buf, start > 0)
}

// tail cleans raw console bytes and keeps the bounded end of them; cut
// says the bytes start in the middle of the console, so the first,
// partial line is dropped.
func tail(raw []byte, cut bool) string {
	text := strings.Map(func(r rune) rune {
		switch {
		case r == '\n' || r == '\t':
			return r
		case r == utf8.RuneError, unicode.IsControl(r):
			return -1
		}
		return r
	}, string(raw))
	if cut {
		if i := strings.IndexByte(text, '\n'); i >= 0 {
			text = text[i+1:]
		}
	}
	text = strings.TrimRight(text, "\n")
	lines := strings.Split(text, "\n")
	if len(lines) > ConsoleLines {
		lines = lines[len(lines)-ConsoleLines:]
	}
	text = strings.Join(lines, "\n")
	for len(text) > ConsoleBytes {
		i := strings.IndexByte(text, '\n')
		if i < 0 {
			// One long line: keep its end, on a rune boundary.
			text = text[len(text)-ConsoleBytes:]
			for !utf8.ValidString(text) {
				text = text[1:]
			}
			break
		}
		text = text[i+1:]
	}
	return text
}
