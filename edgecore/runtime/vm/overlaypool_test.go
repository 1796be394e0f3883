package vm

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// poolStore is an image store in a temp dir with a 64 MiB qcow2 base
// "guest" and a 1 MiB raw base "other".
func poolStore(t *testing.T) (*Images, Image, Image) {
	t.Helper()
	st, qcow, raw := emptyStore(t)
	a, err := st.Import(t.Context(), "guest", qcow, Boot{})
	require.NoError(t, err)
	b, err := st.Import(t.Context(), "other", raw, Boot{})
	require.NoError(t, err)
	return st, a, b
}

// requireOverlayOf checks with qemu-img that path is a sound qcow2
// overlay of img, as `qemu-img create -b BASE -F FORMAT` makes it.
func requireOverlayOf(t *testing.T, path string, img Image) {
	t.Helper()
	info := imgInfoOf(t, path)
	require.Equal(t, "qcow2", info["format"])
	require.Equal(t, img.Path, info["backing-filename"])
	require.Equal(t, img.Format, info["backing-filename-format"])
	require.EqualValues(t, img.VirtualSize, info["virtual-size"])
	qemuImg(t, "check", "-q", path)
}

// The pool of an image: filled ahead with qemu-img's own overlays, taken
// one by one into VM directories (sound overlays of the base, as qemu-img
// would make them there), still there for a store opened again (a
// restart), empty after its last, and gone with its image.
func TestOverlayPoolFillTakeRemove(t *testing.T) {
	ctx := t.Context()
	st, a, b := poolStore(t)
	for _, img := range []Image{a, b} {
		require.NoError(t, st.FillOverlays(ctx, img, 2))
		n, err := st.PooledOverlays(img)
		require.NoError(t, err)
		require.Equal(t, 2, n)
	}
	require.NoError(t, st.FillOverlays(ctx, a, 2))
	n, err := st.PooledOverlays(a)
	require.NoError(t, err)
	require.Equal(t, 2, n, "a full pool is left as it is")

	vmDir := t.TempDir()
	disk := filepath.Join(vmDir, "a1.qcow2")
	ok, rejected := st.TakeOverlay(a, disk)
	require.True(t, ok)
	require.Empty(t, rejected)
	requireOverlayOf(t, disk, a)
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", b.Path, "-F", "raw", filepath.Join(vmDir, "ref.qcow2"))
	other := filepath.Join(vmDir, "b1.qcow2")
	ok, _ = st.TakeOverlay(b, other)
	require.True(t, ok)
	requireOverlayOf(t, other, b)

	again, err := OpenImages(st.Dir(), "")
	require.NoError(t, err)
	n, err = again.PooledOverlays(a)
	require.NoError(t, err)
	require.Equal(t, 1, n, "the pool is files: a restarted edge finds it")
	ok, _ = again.TakeOverlay(a, filepath.Join(vmDir, "a2.qcow2"))
	require.True(t, ok)
	ok, rejected = again.TakeOverlay(a, filepath.Join(vmDir, "a3.qcow2"))
	require.False(t, ok, "an empty pool")
	require.Empty(t, rejected)
	require.NoFileExists(t, filepath.Join(vmDir, "a3.qcow2"))

	require.NoError(t, st.Remove(b.Name, nil))
	require.NoDirExists(t, filepath.Join(st.Dir(), b.Name))
	require.ErrorIs(t, st.FillOverlays(ctx, b, 2), os.ErrNotExist, "no pool for a removed image")
	require.NoDirExists(t, filepath.Join(st.Dir(), b.Name))
}

// Pool entries that are not what they claim are rejected (removed, and
// the reason given), never handed to a VM: an overlay of another base
// under this image's name, one of another size, a file cut short, a file
// of another digest, one that is not qcow2. A crash's half-made file is
// never taken and is cleaned by the next fill once stale.
func TestOverlayPoolRejects(t *testing.T) {
	ctx := t.Context()
	st, a, b := poolStore(t)
	dir := st.overlayDir(a)
	require.NoError(t, os.MkdirAll(dir, 0o755))
	tmp := t.TempDir()
	good := filepath.Join(tmp, "good.qcow2")
	require.NoError(t, st.Overlay(ctx, a, good, 0))
	data, err := os.ReadFile(good)
	require.NoError(t, err)

	name := func(s string) string { return filepath.Join(dir, poolPrefix(a)+s+".qcow2") }
	require.NoError(t, st.Overlay(ctx, b, name("1-other-base"), a.VirtualSize))
	require.NoError(t, st.Overlay(ctx, a, name("2-bigger"), 2*a.VirtualSize))
	require.NoError(t, os.WriteFile(name("3-cut"), data[:120], 0o644))
	require.NoError(t, os.WriteFile(name("4-raw"), make([]byte, 4096), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "sha256-"+strings.Repeat("0", 64)+"-5.qcow2"), data, 0o644))
	half := filepath.Join(dir, ".new-6.qcow2")
	require.NoError(t, os.WriteFile(half, data, 0o644))

	disk := filepath.Join(tmp, "disk.qcow2")
	ok, rejected := st.TakeOverlay(a, disk)
	require.False(t, ok)
	require.Len(t, rejected, 5)
	var why []string
	for _, err := range rejected {
		why = append(why, err.Error())
	}
	for _, want := range []string{"1-other-base.qcow2: backing file", "2-bigger.qcow2: virtual size", "3-cut.qcow2: no backing file, or its name past",
		"4-raw.qcow2: not a qcow2 file", "-5.qcow2: not of digest"} {
		require.True(t, slices.ContainsFunc(why, func(s string) bool { return strings.Contains(s, want) }), "%q among %q", want, why)
	}
	require.NoFileExists(t, disk)
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, ents, 1, "the rejected are removed")
	require.Equal(t, ".new-6.qcow2", ents[0].Name(), "a file being made is not taken")

	old := time.Now().Add(-2 * staleNew)
	require.NoError(t, os.Chtimes(half, old, old))
	require.NoError(t, st.FillOverlays(ctx, a, 1))
	require.NoFileExists(t, half, "a stale half-made file is cleaned")
	ok, rejected = st.TakeOverlay(a, disk)
	require.True(t, ok)
	require.Empty(t, rejected)
	requireOverlayOf(t, disk, a)
}

// A pooled overlay moves to a run directory on another filesystem by copy
// (rename cannot) and is the same sound overlay there.
func TestOverlayPoolAcrossFilesystems(t *testing.T) {
	st, a, _ := poolStore(t)
	shm, err := os.MkdirTemp("/dev/shm", "tether-pool-")
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, os.RemoveAll(shm)) })
	var s1, s2 unix.Statfs_t
	require.NoError(t, unix.Statfs(st.Dir(), &s1))
	require.NoError(t, unix.Statfs(shm, &s2))
	require.NotEqual(t, s1.Type, s2.Type, "/dev/shm is another filesystem")
	require.NoError(t, st.FillOverlays(context.Background(), a, 1))
	disk := filepath.Join(shm, "disk.qcow2")
	ok, rejected := st.TakeOverlay(a, disk)
	require.True(t, ok)
	require.Empty(t, rejected)
	requireOverlayOf(t, disk, a)
	n, err := st.PooledOverlays(a)
	require.NoError(t, err)
	require.Zero(t, n, "the copied entry is gone from the pool")
}

// A store opened by a relative path still makes overlays that find their
// base from anywhere: the base is named by its absolute path (qemu would
// read a relative one from the overlay's directory).
func TestOverlayOfRelativeStore(t *testing.T) {
	t.Chdir(t.TempDir())
	raw := "base.raw"
	require.NoError(t, os.WriteFile(raw, make([]byte, 1<<20), 0o644))
	st, err := OpenImages("vm-images", "")
	require.NoError(t, err)
	img, err := st.Import(t.Context(), "rel", raw, Boot{})
	require.NoError(t, err)
	require.True(t, filepath.IsAbs(img.Path), img.Path)
	disk := filepath.Join(t.TempDir(), "disk.qcow2")
	require.NoError(t, st.Overlay(t.Context(), img, disk, 0))
	qemuImg(t, "info", "--backing-chain", disk)
	require.NoError(t, st.FillOverlays(t.Context(), img, 1))
	pooled := filepath.Join(t.TempDir(), "pooled.qcow2")
	ok, rejected := st.TakeOverlay(img, pooled)
	require.True(t, ok)
	require.Empty(t, rejected)
	qemuImg(t, "info", "--backing-chain", pooled)
}

// FuzzCheckOverlay: whatever a pool file holds, the check answers (an
// error or nil) and never panics; nil only for a header that names the
// base.
func FuzzCheckOverlay(f *testing.F) {
	dir := f.TempDir()
	base := filepath.Join(dir, "base.raw")
	require.NoError(f, os.WriteFile(base, make([]byte, 1<<20), 0o644))
	img := Image{Path: base, Format: "raw", VirtualSize: 1 << 20}
	good := filepath.Join(dir, "good.qcow2")
	qemuImg(f, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", good)
	data, err := os.ReadFile(good)
	require.NoError(f, err)
	f.Add(data[:4096])
	f.Add(data[:120])
	f.Add([]byte("QFI\xfb"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(t.TempDir(), "x.qcow2")
		require.NoError(t, os.WriteFile(p, b, 0o644))
		if checkOverlay(p, img) == nil {
			require.Contains(t, string(b), base)
		}
	})
}
