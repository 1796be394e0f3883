package vm

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The seed is an ISO 9660 filesystem labelled cidata as blkid (what
// cloud-init uses to find it) and file(1) read it, and its root directory
// holds user-data and meta-data with their contents. It cannot be mounted
// here (this kernel has no iso9660), so the directory is read back by the
// test itself.
func TestSeedImage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seed.iso")
	user := "#cloud-config\n" + strings.Repeat("x", 5000) + "\n" // more than one sector
	require.NoError(t, writeSeed(path, "vm-1", "vm-1", user, time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)))

	out, err := exec.Command("blkid", "-p", "-o", "export", path).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "TYPE=iso9660")
	require.Contains(t, string(out), "LABEL=cidata")
	out, err = exec.Command("file", "-b", path).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "ISO 9660 CD-ROM filesystem data 'cidata'")

	img, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Zero(t, len(img)%isoSector)
	require.Equal(t, uint32(len(img)/isoSector), binary.LittleEndian.Uint32(img[16*isoSector+80:]), "volume space size")
	root := img[16*isoSector+156:]
	extent, size := binary.LittleEndian.Uint32(root[2:]), binary.LittleEndian.Uint32(root[10:])
	dir := img[int(extent)*isoSector : int(extent)*isoSector+int(size)]
	files := map[string]string{}
	for off := 0; off < len(dir) && dir[off] != 0; off += int(dir[off]) {
		r := dir[off:]
		id := string(r[33 : 33+int(r[32])])
		if r[25]&2 != 0 {
			continue
		}
		at, n := binary.LittleEndian.Uint32(r[2:]), binary.BigEndian.Uint32(r[14:])
		files[id] = string(img[int(at)*isoSector : int(at)*isoSector+int(n)])
	}
	require.Equal(t, map[string]string{
		"USER-DATA;1": user,
		"META-DATA;1": "instance-id: vm-1\nlocal-hostname: vm-1\n",
	}, files)
}
