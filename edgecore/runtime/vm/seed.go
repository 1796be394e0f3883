package vm

import (
	"encoding/binary"
	"fmt"
	"os"
	"sort"
	"time"
)

// A NoCloud seed: cloud-init finds a filesystem labelled "cidata" and reads
// its files user-data and meta-data. The backend writes it as a minimal
// ISO 9660 image (no extensions), read-only to the guest:
//
//	sector 0-15   system area, zero
//	sector 16     primary volume descriptor, volume id "cidata"
//	sector 17     volume descriptor set terminator
//	sector 18     path table, little-endian (one entry: the root)
//	sector 19     path table, big-endian
//	sector 20     root directory: ".", "..", META-DATA;1, USER-DATA;1
//	sector 21...  the files, each from a sector boundary
//
// Without Rock Ridge or Joliet, Linux's isofs shows "USER-DATA;1" as
// user-data (map=normal lowercases and strips the version), which is what
// cloud-init reads. Writing it here spares a genisoimage dependency.

const isoSector = 2048

// seedFile is one file of the seed.
type seedFile struct {
	name string // ISO identifier, as "USER-DATA;1"
	data []byte
}

// writeSeed writes the NoCloud seed of a VM to path.
func writeSeed(path, instanceID, hostname, userData string, now time.Time) error {
	meta := fmt.Sprintf("instance-id: %s\nlocal-hostname: %s\n", instanceID, hostname)
	img := isoImage("cidata", []seedFile{{"USER-DATA;1", []byte(userData)}, {"META-DATA;1", []byte(meta)}}, now)
	if err := os.WriteFile(path, img, 0o600); err != nil {
		return fmt.Errorf("write cloud-init seed: %w", err)
	}
	return nil
}

// isoImage is an ISO 9660 image of files in its root directory.
func isoImage(volume string, files []seedFile, now time.Time) []byte {
	sort.Slice(files, func(i, j int) bool { return files[i].name < files[j].name })
	const (
		pvdAt, termAt, lPathAt, mPathAt, rootAt = 16, 17, 18, 19, 20
	)
	extents := make([]uint32, len(files))
	next := uint32(rootAt + 1)
	for i, f := range files {
		extents[i] = next
		next += uint32((len(f.data) + isoSector - 1) / isoSector)
		if len(f.data) == 0 {
			next++ // an empty file still gets its own (empty) extent
		}
	}
	total := next
	img := make([]byte, int(total)*isoSector)
	sector := func(n uint32) []byte { return img[int(n)*isoSector : int(n+1)*isoSector] }

	// The root directory.
	root := sector(rootAt)
	off := putDirRecord(root, 0, []byte{0}, rootAt, isoSector, true, now)
	off += putDirRecord(root, off, []byte{1}, rootAt, isoSector, true, now)
	for i, f := range files {
		off += putDirRecord(root, off, []byte(f.name), extents[i], uint32(len(f.data)), false, now)
		copy(img[int(extents[i])*isoSector:], f.data)
	}

	// The path tables: the root only.
	for _, pt := range []struct {
		at  uint32
		ord binary.ByteOrder
	}{{lPathAt, binary.LittleEndian}, {mPathAt, binary.BigEndian}} {
		s := sector(pt.at)
		s[0] = 1 // identifier length
		pt.ord.PutUint32(s[2:6], rootAt)
		pt.ord.PutUint16(s[6:8], 1) // parent: itself
	}

	pvd := sector(pvdAt)
	pvd[0] = 1
	copy(pvd[1:6], "CD001")
	pvd[6] = 1
	padded(pvd[8:40], "LINUX")
	// As genisoimage -V cidata does, the volume id keeps its case:
	// cloud-init looks for the label "cidata".
	padded(pvd[40:72], volume)
	both32(pvd[80:88], total)
	both16(pvd[120:124], 1)
	both16(pvd[124:128], 1)
	both16(pvd[128:132], isoSector)
	both32(pvd[132:140], 10) // path table: one 10-byte entry
	binary.LittleEndian.PutUint32(pvd[140:144], lPathAt)
	binary.BigEndian.PutUint32(pvd[148:152], mPathAt)
	putDirRecord(pvd[156:190], 0, []byte{0}, rootAt, isoSector, true, now)
	for _, r := range [][2]int{{190, 318}, {318, 446}, {446, 574}, {574, 702}, {702, 739}, {739, 776}, {776, 813}} {
		padded(pvd[r[0]:r[1]], "")
	}
	stamp := []byte(now.UTC().Format("20060102150405") + "00")
	copy(pvd[813:829], stamp) // creation; [829] is the zone: UTC
	copy(pvd[830:846], stamp) // modification
	copy(pvd[847:863], "0000000000000000")
	copy(pvd[864:880], "0000000000000000")
	pvd[881] = 1

	term := sector(termAt)
	term[0] = 255
	copy(term[1:6], "CD001")
	term[6] = 1
	return img
}

// putDirRecord writes a directory record at buf[off:] and returns its
// length.
func putDirRecord(buf []byte, off int, id []byte, extent, size uint32, dir bool, now time.Time) int {
	n := 33 + len(id)
	if n%2 == 1 {
		n++
	}
	r := buf[off : off+n]
	r[0] = byte(n)
	both32(r[2:10], extent)
	both32(r[10:18], size)
	t := now.UTC()
	r[18], r[19], r[20] = byte(t.Year()-1900), byte(t.Month()), byte(t.Day())
	r[21], r[22], r[23] = byte(t.Hour()), byte(t.Minute()), byte(t.Second())
	if dir {
		r[25] = 2
	}
	both16(r[28:32], 1)
	r[32] = byte(len(id))
	copy(r[33:], id)
	return n
}

func both16(b []byte, v uint16) {
	binary.LittleEndian.PutUint16(b[0:2], v)
	binary.BigEndian.PutUint16(b[2:4], v)
}

func both32(b []byte, v uint32) {
	binary.LittleEndian.PutUint32(b[0:4], v)
	binary.BigEndian.PutUint32(b[4:8], v)
}

// padded fills b with s and spaces.
func padded(b []byte, s string) {
	for i := range b {
		b[i] = ' '
	}
	copy(b, s)
}
