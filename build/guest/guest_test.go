package guest

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
)

// A synthetic modules tree (real files in a temp dir): dependencies come
// first, deepest last in modules.dep is loaded first, shared ones once.
func TestModuleOrder(t *testing.T) {
	dir := t.TempDir()
	dep := "kernel/a/top.ko: kernel/a/mid.ko kernel/a/base.ko\n" +
		"kernel/a/mid.ko: kernel/a/base.ko\n" +
		"kernel/a/base.ko:\n" +
		"kernel/b/other.ko: kernel/a/base.ko\n" +
		"kernel/c/packed.ko.xz:\n"
	require.NoError(t, os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/d/inside.ko\n"), 0o644))

	order, err := moduleOrder(dir, []string{"top", "other", "inside"})
	require.NoError(t, err)
	require.Equal(t, []string{"kernel/a/base.ko", "kernel/a/mid.ko", "kernel/a/top.ko", "kernel/b/other.ko"}, order)

	_, err = moduleOrder(dir, []string{"missing"})
	require.ErrorContains(t, err, "not in")
	_, err = moduleOrder(dir, []string{"packed"})
	require.ErrorContains(t, err, "compressed")
}

// Build writes the initramfs once per input: the second call finds it.
// The archive holds /init, the console node, busybox and the modules in
// load order.
func TestBuildCaches(t *testing.T) {
	cache := t.TempDir()
	p, err := Build(Config{CacheDir: cache})
	require.NoError(t, err)
	st, err := os.Stat(p.Initrd)
	require.NoError(t, err)
	p2, err := Build(Config{CacheDir: cache})
	require.NoError(t, err)
	require.Equal(t, p, p2)
	st2, err := os.Stat(p.Initrd)
	require.NoError(t, err)
	require.Equal(t, st.ModTime(), st2.ModTime(), "rebuilt")

	f, err := os.Open(p.Initrd)
	require.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	raw, err := io.ReadAll(zr)
	require.NoError(t, err)
	files := readCPIO(t, raw)
	require.Equal(t, initScript, files["init"])
	require.Contains(t, files, "dev/console")
	require.Contains(t, files, "bin/busybox")
	require.Equal(t, "virtio_ring.ko\nvirtio.ko\nvirtio_pci_modern_dev.ko\nvirtio_pci_legacy_dev.ko\nvirtio_pci.ko\nvirtio_blk.ko\nbutton.ko\nevdev.ko\n",
		string(files["etc/modules"]))
}

// readCPIO parses newc entries into name -> data, checking the trailer.
func readCPIO(t *testing.T, b []byte) map[string][]byte {
	files := map[string][]byte{}
	field := func(h []byte, i int) int {
		n, err := strconv.ParseUint(string(h[6+8*i:14+8*i]), 16, 32)
		require.NoError(t, err)
		return int(n)
	}
	align := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		require.GreaterOrEqual(t, len(b)-off, 110)
		h := b[off : off+110]
		require.True(t, bytes.HasPrefix(h, []byte("070701")))
		size, nameLen := field(h, 6), field(h, 11)
		name := string(b[off+110 : off+110+nameLen-1])
		data := align(off + 110 + nameLen)
		if name == "TRAILER!!!" {
			return files
		}
		files[name] = b[data : data+size]
		off = align(data + size)
	}
}
