package vm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The overlay pool: qcow2 overlays made ahead of time, so that a VM's
// CreateContainer takes a file instead of running qemu-img (a process:
// 30-100 ms on a loaded edge node, most of Tether's own create path).
//
//	DIR/NAME/overlays/sha256-HEX-ID.qcow2   ready overlays of image NAME,
//	                                        HEX its digest, ID random
//	DIR/NAME/overlays/.new-ID.qcow2         being made (or left by a crash)
//
// An overlay is made by the same qemu-img command as Overlay, with the
// base's virtual size, into a .new- name and renamed into place when
// qemu-img has exited. A qcow2 overlay names its backing file by absolute
// path and its own position is nowhere in it, so moving it into a VM's
// directory (rename, or a copy when the run directory is on another
// filesystem: a few hundred KiB of metadata) yields the disk qemu-img
// would have made there.
//
// TakeOverlay renames an entry out first (so two takers never share one)
// and then checks it: its name carries the image's digest, its header is
// qcow2 with the image's base as its backing file, the base's format and
// the base's virtual size. An entry that fails is removed and reported;
// the caller falls back to qemu-img. The pool lives in the image's own
// directory, so it survives a restart and goes with Remove; FillOverlays
// runs under the store's lock, so it never writes into an image Remove is
// deleting.

// overlayDir is where image img's pool lives.
func (s *Images) overlayDir(img Image) string { return filepath.Join(s.dir, img.Name, "overlays") }

// poolPrefix is the name prefix of img's ready overlays.
func poolPrefix(img Image) string { return strings.Replace(img.Digest, ":", "-", 1) + "-" }

// staleNew is how old a .new- file must be for FillOverlays to take it for
// a crash's leftover.
const staleNew = time.Minute

// FillOverlays makes overlays of img until its pool holds n (at most n
// runs of qemu-img), and removes the .new- files a crash left. It holds
// the store's lock (Import and Remove wait).
func (s *Images) FillOverlays(ctx context.Context, img Image, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := os.Stat(filepath.Join(s.dir, img.Name, "image.json")); err != nil {
		return fmt.Errorf("fill overlays of %q: %w", img.Name, err) // removed meanwhile
	}
	dir := s.overlayDir(img)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create overlay pool: %w", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list overlay pool: %w", err)
	}
	ready := 0
	for _, e := range ents {
		switch name := e.Name(); {
		case strings.HasPrefix(name, poolPrefix(img)) && strings.HasSuffix(name, ".qcow2"):
			ready++
		case strings.HasPrefix(name, ".new-"):
			if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > staleNew {
				_ = os.Remove(filepath.Join(dir, name)) // a leftover; gone is as good
			}
		default:
			// Another digest's (the image was replaced by a crash between
			// Remove's steps) or unknown: never taken, so removed.
			_ = os.Remove(filepath.Join(dir, name))
		}
	}
	for ; ready < n; ready++ {
		id := newID()
		tmp := filepath.Join(dir, ".new-"+id+".qcow2")
		if err := s.Overlay(ctx, img, tmp, 0); err != nil {
			return errors.Join(err, removeIfExists(tmp))
		}
		if err := os.Rename(tmp, filepath.Join(dir, poolPrefix(img)+id+".qcow2")); err != nil {
			return errors.Join(fmt.Errorf("install pooled overlay: %w", err), removeIfExists(tmp))
		}
	}
	return nil
}

// PooledOverlays is the number of ready overlays of img.
func (s *Images) PooledOverlays(img Image) (int, error) {
	ents, err := os.ReadDir(s.overlayDir(img))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("list overlay pool: %w", err)
	}
	n := 0
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), poolPrefix(img)) {
			n++
		}
	}
	return n, nil
}

// TakeOverlay moves a ready overlay of img to path (which must not
// exist). ok is false when the pool had none that passed the check: the
// caller makes one with Overlay. rejected are the entries that failed the
// check, each already removed. It does not take the store's lock: a
// rename is its only step that races, and it is atomic.
func (s *Images) TakeOverlay(img Image, path string) (ok bool, rejected []error) {
	dir := s.overlayDir(img)
	ents, err := os.ReadDir(dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			rejected = append(rejected, fmt.Errorf("list overlay pool: %w", err))
		}
		return false, rejected
	}
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, ".") {
			continue // being made
		}
		src := filepath.Join(dir, name)
		if !strings.HasPrefix(name, poolPrefix(img)) || !strings.HasSuffix(name, ".qcow2") {
			rejected = append(rejected, fmt.Errorf("pooled overlay %s: not of digest %s", name, img.Digest))
			_ = removeIfExists(src)
			continue
		}
		err := moveFile(src, path)
		if errors.Is(err, fs.ErrNotExist) {
			continue // another taker had it
		}
		if err != nil {
			// The pool is not at fault (the target, the filesystem): keep it.
			return false, append(rejected, fmt.Errorf("take pooled overlay %s: %w", name, err))
		}
		if err := checkOverlay(path, img); err != nil {
			rejected = append(rejected, fmt.Errorf("pooled overlay %s: %w", name, err))
			_ = removeIfExists(path)
			continue
		}
		return true, rejected
	}
	return false, rejected
}

// moveFile renames src to dst, or copies and removes it when they are on
// two filesystems.
func moveFile(src, dst string) error {
	err := os.Rename(src, dst)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		return errors.Join(err, out.Close(), os.Remove(dst))
	}
	if err := out.Close(); err != nil {
		return errors.Join(err, os.Remove(dst))
	}
	return os.Remove(src)
}

// qcow2 header fields (big-endian; QEMU's docs/interop/qcow2.txt) the
// check reads.
const (
	qcowMagic         = 0x514649fb // "QFI\xfb"
	qcowHeaderV2      = 72         // bytes of a version 2 header
	qcowExtBackingFmt = 0xe2792aca // header extension: backing file format
	qcowMaxHeader     = 64 << 10   // the check reads at most this much
)

// checkOverlay checks that path is a qcow2 overlay of img: magic, version
// 2 or 3, the backing file img.Path, the backing format img.Format (when
// the header names one; qemu-img create -F always does) and the virtual
// size img.VirtualSize.
func checkOverlay(path string, img Image) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, qcowMaxHeader)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("read qcow2 header: %w", err)
	}
	buf = buf[:n]
	if len(buf) < qcowHeaderV2 || binary.BigEndian.Uint32(buf) != qcowMagic {
		return errors.New("not a qcow2 file")
	}
	version := binary.BigEndian.Uint32(buf[4:])
	if version != 2 && version != 3 {
		return fmt.Errorf("qcow2 version %d", version)
	}
	if size := int64(binary.BigEndian.Uint64(buf[24:])); size != img.VirtualSize {
		return fmt.Errorf("virtual size %d, the base's is %d", size, img.VirtualSize)
	}
	off, ln := binary.BigEndian.Uint64(buf[8:]), uint64(binary.BigEndian.Uint32(buf[16:]))
	if off == 0 || off > uint64(len(buf)) || ln > uint64(len(buf))-off {
		return errors.New("no backing file, or its name past the end of what was read (a file cut short)")
	}
	if backing := string(buf[off : off+ln]); backing != img.Path {
		return fmt.Errorf("backing file %q, not %q", backing, img.Path)
	}
	if version == 2 {
		return nil // no header extensions
	}
	if len(buf) < 104 {
		return errors.New("qcow2 version 3 header cut short")
	}
	hdrLen := uint64(binary.BigEndian.Uint32(buf[100:]))
	for p := hdrLen; p+8 <= uint64(len(buf)) && p < off; {
		typ, l := binary.BigEndian.Uint32(buf[p:]), uint64(binary.BigEndian.Uint32(buf[p+4:]))
		if typ == 0 {
			break // end of extensions
		}
		data := p + 8
		if l > uint64(len(buf))-data {
			return errors.New("qcow2 header extension past the header")
		}
		if typ == qcowExtBackingFmt {
			if f := string(bytes.TrimRight(buf[data:data+l], "\x00")); f != img.Format {
				return fmt.Errorf("backing format %q, not %q", f, img.Format)
			}
		}
		p = data + (l+7)&^7
	}
	return nil
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
