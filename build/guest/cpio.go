package guest

import (
	"bytes"
	"fmt"
)

// cpioWriter writes the "newc" cpio format the kernel unpacks as an
// initramfs (Documentation/driver-api/early-userspace/buffer-format.rst):
// per entry a 110-byte ASCII header ("070701" and 13 eight-digit hex
// fields: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
// rdevmajor, rdevminor, namesize with its NUL, check), the name and a NUL
// padded to 4 bytes, the data padded to 4 bytes; last the entry
// "TRAILER!!!". Times are zero, owners root, so the same inputs give the
// same bytes.
type cpioWriter struct {
	buf bytes.Buffer
	ino uint32
}

const (
	modeDir  = 0o040000
	modeFile = 0o100000
	modeLink = 0o120000
	modeChar = 0o020000
)

func (w *cpioWriter) entry(name string, mode uint32, data []byte, rdevMajor, rdevMinor uint32) {
	w.ino++
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	fmt.Fprintf(&w.buf, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		w.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *cpioWriter) dir(name string)                         { w.entry(name, modeDir|0o755, nil, 0, 0) }
func (w *cpioWriter) file(name string, perm uint32, b []byte) { w.entry(name, modeFile|perm, b, 0, 0) }
func (w *cpioWriter) symlink(name, target string) {
	w.entry(name, modeLink|0o777, []byte(target), 0, 0)
}
func (w *cpioWriter) char(name string, major, minor uint32) {
	w.entry(name, modeChar|0o600, nil, major, minor)
}

// bytes ends the archive and returns it.
func (w *cpioWriter) bytes() []byte {
	w.entry("TRAILER!!!", 0, nil, 0, 0)
	return w.buf.Bytes()
}
