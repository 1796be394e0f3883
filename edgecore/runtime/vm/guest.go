package vm

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// What the backend learns of the guest from its serial console, and how it
// tells the pod manager.
//
// The console (ttyS0) is appended by QEMU to the container's CRI log path.
// A watcher reads what is new in that file every ConsolePoll and looks for
// BootMarker; the first time it sees it, the container's BootedAt is set
// (the time it was seen: up to one ConsolePoll late) and the console's
// tail is kept. ContainerStatus(verbose) hands both on in
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

// markerScanner finds BootMarker in a growing file, reading each byte once.
type markerScanner struct {
	path   string
	offset int64
	// carry is the end of the last read that could be the start of the
	// marker.
	carry []byte
}

// scan reads what is new and reports whether the marker is in it (or was
// split across the last read).
func (s *markerScanner) scan() (bool, error) {
	f, err := os.Open(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	if _, err := f.Seek(s.offset, io.SeekStart); err != nil {
		return false, err
	}
	buf := make([]byte, 64<<10)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			s.offset += int64(n)
			chunk := append(s.carry, buf[:n]...)
			if bytes.Contains(chunk, []byte(BootMarker)) {
				return true, nil
			}
			keep := min(len(chunk), len(BootMarker)-1)
			s.carry = append([]byte(nil), chunk[len(chunk)-keep:]...)
		}
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
	}
}

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
	// Read enough that cleaning still leaves ConsoleBytes.
	const window = 4 * ConsoleBytes
	start := max(info.Size()-window, 0)
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
