package vm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The serial console as a CRI log.
//
// QEMU appends the guest's ttyS0 to a raw file in the sandbox directory
// (Dir/console-<container id>.raw). The container's watcher converts what
// is new in it, every ConsolePoll, into the CRI log format at the
// container's log path, one entry per line of the guest:
//
//	2026-12-01T15:04:05.123456789Z stdout F the line
//
// (kubelet's pkg/kubelet/kuberuntime/logs reads it, and crictl logs). The
// guest's "\r\n" ends are taken off; a line longer than MaxLogLine is split
// into P (partial) entries and a last F entry, as containerd does, and
// readers join them again. A line the guest has not ended yet is held until
// its newline; after PartialFlush without one (a login prompt), what there
// is goes out as a P entry. When QEMU has exited the rest goes out as F and
// the log is fsynced. The timestamp is the conversion's: up to ConsolePoll
// late, and for what the guest printed while EdgeCore was down, the time it
// came back.
//
// Exactly once across an EdgeCore restart (QEMU outlives EdgeCore and keeps
// writing the raw file): the converter's state file (Dir/console-<id>.state)
// holds the raw offset converted so far and the size and identity (device,
// inode) of the log file after those entries. Each conversion appends its
// entries to the log first and writes the state after. A restart between
// the two finds the same log file longer than its state says and truncates
// it back to that size, and the entries are written again from the same
// raw offset: none lost, none twice. Only if the log was also rotated in
// that window (renamed, a new file at the path) are the entries written to
// the rotated file after the state written again to the new one.
//
// The state is two slots written in turn, each with a sequence number and
// a CRC, so a write torn by a power loss leaves the older one. Neither file
// is fsynced at each conversion: a SIGKILL of EdgeCore loses nothing the
// kernel already has, and a power loss ends QEMU too.
//
// ReopenContainerLog (log rotation: the caller has renamed the log) opens
// the path again and records the new file in the state.
//
// The raw file is bounded: once converted and recorded, its bytes are
// freed by punching a hole (fallocate PUNCH_HOLE|KEEP_SIZE: size and
// offsets stay, QEMU's appends are unaffected, the blocks go) up to
// consoleRawKeep bytes before the converted offset, which stay for the
// console tail (consoleTail reads the raw file). It holds about what is not
// yet converted, so it grows only while EdgeCore is down. A filesystem that
// cannot punch holes keeps the whole raw file (counted, logged).

// MaxLogLine is the longest entry of the CRI log: longer lines are split,
// as containerd's max_container_log_line_size (16 KiB) splits them.
const MaxLogLine = 16 << 10

// PartialFlush is how long an unfinished line is held before what there is
// of it is written as a P entry.
const PartialFlush = time.Second

// consoleRawKeep is how much of the converted console stays in the raw
// file, for the console tail.
const consoleRawKeep = consoleWindow

// consoleReadMax bounds one read of the raw file.
const consoleReadMax = 256 << 10

// logEntry is one entry of a CRI log: a line or, partial, a piece of one.
type logEntry struct {
	partial bool
	text    []byte
}

// splitMode says what happens to an unfinished line at the end of the
// bytes given to splitConsole.
type splitMode int

const (
	// holdPartial keeps it for the next call (unless longer than max).
	holdPartial splitMode = iota
	// flushPartial writes it as a P entry (but a last '\r', which is
	// likely the start of "\r\n").
	flushPartial
	// flushFinal writes it as an F entry: the console has ended.
	flushFinal
)

// splitConsole cuts raw console bytes into CRI log entries of at most max
// bytes of text, and returns how many bytes of raw they cover. Each line
// ending in '\n' is one F entry (one '\r' before the newline taken off),
// preceded by P entries of max bytes when it is longer. What follows the
// last newline is cut into P entries while longer than max; the rest
// depends on mode. Entries' text alias raw.
func splitConsole(raw []byte, max int, mode splitMode) (entries []logEntry, n int) {
	for {
		rest := raw[n:]
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			break
		}
		line := bytes.TrimSuffix(rest[:i], []byte{'\r'})
		for len(line) > max {
			entries = append(entries, logEntry{partial: true, text: line[:max]})
			line = line[max:]
		}
		entries = append(entries, logEntry{text: line})
		n += i + 1
	}
	for len(raw)-n > max {
		entries = append(entries, logEntry{partial: true, text: raw[n : n+max]})
		n += max
	}
	rest := raw[n:]
	switch mode {
	case flushPartial:
		if len(rest) > 0 && rest[len(rest)-1] == '\r' {
			rest = rest[:len(rest)-1]
		}
		if len(rest) > 0 {
			entries = append(entries, logEntry{partial: true, text: rest})
			n += len(rest)
		}
	case flushFinal:
		if len(rest) > 0 {
			entries = append(entries, logEntry{text: bytes.TrimSuffix(rest, []byte{'\r'})})
			n = len(raw)
		}
	}
	return entries, n
}

// appendEntry appends e in the CRI log format, stamped ts.
func appendEntry(buf []byte, ts time.Time, e logEntry) []byte {
	buf = ts.UTC().AppendFormat(buf, time.RFC3339Nano)
	buf = append(buf, " stdout "...)
	if e.partial {
		buf = append(buf, 'P')
	} else {
		buf = append(buf, 'F')
	}
	buf = append(buf, ' ')
	buf = append(buf, e.text...)
	return append(buf, '\n')
}

// consoleState is what the state file records.
type consoleState struct {
	seq     uint64
	off     int64 // raw bytes converted
	logSize int64 // the log's size after them
	logDev  uint64
	logIno  uint64
}

const (
	stateMagic = "TVC1"
	stateSlot  = 48 // magic, seq, off, logSize, logDev, logIno, crc32
)

func (s consoleState) encode() []byte {
	b := make([]byte, stateSlot)
	copy(b, stateMagic)
	binary.LittleEndian.PutUint64(b[4:], s.seq)
	binary.LittleEndian.PutUint64(b[12:], uint64(s.off))
	binary.LittleEndian.PutUint64(b[20:], uint64(s.logSize))
	binary.LittleEndian.PutUint64(b[28:], s.logDev)
	binary.LittleEndian.PutUint64(b[36:], s.logIno)
	binary.LittleEndian.PutUint32(b[44:], crc32.ChecksumIEEE(b[:44]))
	return b
}

func decodeState(b []byte) (consoleState, bool) {
	if len(b) < stateSlot || string(b[:4]) != stateMagic || crc32.ChecksumIEEE(b[:44]) != binary.LittleEndian.Uint32(b[44:]) {
		return consoleState{}, false
	}
	s := consoleState{
		seq: binary.LittleEndian.Uint64(b[4:]), off: int64(binary.LittleEndian.Uint64(b[12:])),
		logSize: int64(binary.LittleEndian.Uint64(b[20:])), logDev: binary.LittleEndian.Uint64(b[28:]),
		logIno: binary.LittleEndian.Uint64(b[36:]),
	}
	return s, s.off >= 0 && s.logSize >= 0
}

// consoleLog converts one container's raw console file into its CRI log.
// Its methods are safe for concurrent use (the watcher converts,
// ReopenContainerLog reopens).
type consoleLog struct {
	rawPath, logPath, statePath string
	keep                        int64

	mu    sync.Mutex
	raw   *os.File // nil until QEMU has made it
	log   *os.File
	state *os.File
	st    consoleState
	// pending are the raw bytes read after st.off, not yet converted.
	pending []byte
	// grew is when pending last grew.
	grew time.Time
	// punched is the raw offset below which the blocks are freed.
	punched int64
	// passthrough: QEMU writes the log path itself (a record of an older
	// backend); nothing is converted or punched.
	passthrough bool
}

// errStateCorrupt says the state file had no valid slot: the console is
// converted again from its start.
var errStateCorrupt = errors.New("vm: console state file has no valid record")

// openConsole opens the converter of raw into log with its state file,
// recovering from a restart between a conversion and its state (see
// above). keep is consoleRawKeep but in tests. A corrupt state file is
// reported with errStateCorrupt beside a working converter.
func openConsole(rawPath, logPath, statePath string, keep int64) (*consoleLog, error) {
	c := &consoleLog{rawPath: rawPath, logPath: logPath, statePath: statePath, keep: keep, passthrough: rawPath == logPath}
	if c.passthrough {
		return c, nil
	}
	sf, err := os.OpenFile(statePath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open console state: %w", err)
	}
	c.state = sf
	var buf [2 * stateSlot]byte
	n, err := sf.ReadAt(buf[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, errors.Join(fmt.Errorf("read console state: %w", err), sf.Close())
	}
	var found, corrupt bool
	for i := range 2 {
		if n < (i+1)*stateSlot {
			break
		}
		if s, ok := decodeState(buf[i*stateSlot : (i+1)*stateSlot]); ok && (!found || s.seq > c.st.seq) {
			c.st, found = s, true
		}
	}
	corrupt = !found && n > 0
	lf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("open console log: %w", err), sf.Close())
	}
	c.log = lf
	size, dev, ino, err := fileID(lf)
	if err != nil {
		return nil, errors.Join(err, c.close(false))
	}
	if found && dev == c.st.logDev && ino == c.st.logIno && size > c.st.logSize {
		// Entries written after the last state: they are written again.
		if err := lf.Truncate(c.st.logSize); err != nil {
			return nil, errors.Join(fmt.Errorf("truncate console log to its recorded size: %w", err), c.close(false))
		}
		size = c.st.logSize
	}
	c.st.logSize, c.st.logDev, c.st.logIno = size, dev, ino
	if corrupt {
		return c, errStateCorrupt
	}
	return c, nil
}

func fileID(f *os.File) (size int64, dev, ino uint64, err error) {
	info, err := f.Stat()
	if err != nil {
		return 0, 0, 0, fmt.Errorf("stat console log: %w", err)
	}
	sys, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, 0, errors.New("stat console log: no device and inode")
	}
	return info.Size(), uint64(sys.Dev), sys.Ino, nil //nolint:unconvert // Dev is not uint64 everywhere
}

// read reads what is new in the raw file (at most consoleReadMax) and
// returns it; it is converted by the next flush. A raw file QEMU has not
// made yet reads as nothing.
func (c *consoleLog) read(now time.Time) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.pending) >= consoleReadMax {
		// The log cannot be written (a full disk): read no more until it
		// can, so memory stays bounded; QEMU's file keeps the rest.
		return nil, nil
	}
	if c.raw == nil {
		// Read-write: punching a hole needs a writable descriptor. QEMU
		// appends; this descriptor never writes.
		f, err := os.OpenFile(c.rawPath, os.O_RDWR, 0)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("open raw console: %w", err)
		}
		c.raw = f
	}
	at := c.st.off + int64(len(c.pending))
	c.pending = slices.Grow(c.pending, consoleReadMax)
	got := c.pending[len(c.pending) : len(c.pending)+consoleReadMax]
	n, err := c.raw.ReadAt(got, at)
	c.pending = c.pending[:len(c.pending)+n]
	if n > 0 {
		c.grew = now
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return got[:n], fmt.Errorf("read raw console: %w", err)
	}
	return got[:n], nil
}

// flush writes the complete lines read so far (final: everything) to the
// log, then the state, then frees the converted raw bytes. now stamps the
// entries.
func (c *consoleLog) flush(now time.Time, final bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.passthrough {
		c.st.off += int64(len(c.pending))
		c.pending = c.pending[:0]
		return nil
	}
	if c.log == nil {
		return errors.New("vm: the console converter is closed")
	}
	mode := holdPartial
	switch {
	case final:
		mode = flushFinal
	case len(c.pending) > 0 && now.Sub(c.grew) >= PartialFlush:
		mode = flushPartial
	}
	entries, n := splitConsole(c.pending, MaxLogLine, mode)
	if n == 0 {
		return nil
	}
	var buf []byte
	for _, e := range entries {
		buf = appendEntry(buf, now, e)
	}
	if _, err := c.log.Write(buf); err != nil {
		// Take a partial write back, so the log holds whole entries.
		return errors.Join(fmt.Errorf("write console log: %w", err), c.log.Truncate(c.st.logSize))
	}
	next := c.st
	next.seq++
	next.off += int64(n)
	next.logSize += int64(len(buf))
	if err := c.writeState(next); err != nil {
		return err
	}
	c.pending = c.pending[:copy(c.pending, c.pending[n:])]
	return c.punch()
}

// writeState records s in the slot the last state is not in.
func (c *consoleLog) writeState(s consoleState) error {
	if _, err := c.state.WriteAt(s.encode(), int64(s.seq%2)*stateSlot); err != nil {
		return fmt.Errorf("write console state: %w", err)
	}
	c.st = s
	return nil
}

// errPunch marks a failure to free converted raw bytes: the conversion
// itself succeeded. The converter stops trying.
var errPunch = errors.New("vm: cannot free the converted raw console")

// punch frees the raw file's blocks below st.off-keep (whole pages).
func (c *consoleLog) punch() error {
	if c.keep < 0 || c.raw == nil {
		return nil
	}
	const page = 4096
	end := (c.st.off - c.keep) / page * page
	if end <= c.punched {
		return nil
	}
	err := unix.Fallocate(int(c.raw.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, c.punched, end-c.punched)
	if err != nil {
		c.keep = -1
		return fmt.Errorf("%w: punch a hole in %s: %w", errPunch, c.rawPath, err)
	}
	c.punched = end
	return nil
}

// reopen opens the log path again (it was rotated) and records the new
// file. Entries already written went to the old file.
func (c *consoleLog) reopen() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.passthrough {
		return errors.New("vm: this container's console is written by QEMU itself and cannot be reopened")
	}
	if c.state == nil {
		return errors.New("vm: the console has ended")
	}
	lf, err := os.OpenFile(c.logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("reopen console log: %w", err)
	}
	size, dev, ino, err := fileID(lf)
	if err != nil {
		return errors.Join(err, lf.Close())
	}
	next := c.st
	next.seq++
	next.logSize, next.logDev, next.logIno = size, dev, ino
	if err := c.writeState(next); err != nil {
		return errors.Join(err, lf.Close())
	}
	old := c.log
	c.log = lf
	return old.Close()
}

// close closes the files; sync fsyncs the log and the state first (the
// console has ended).
func (c *consoleLog) close(sync bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, f := range []*os.File{c.log, c.state, c.raw} {
		if f == nil {
			continue
		}
		if sync && f != c.raw {
			errs = append(errs, f.Sync())
		}
		errs = append(errs, f.Close())
	}
	c.log, c.state, c.raw = nil, nil, nil
	return errors.Join(errs...)
}
