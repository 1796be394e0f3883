package vm

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// qemuImg runs the real qemu-img and fails the test on error.
func qemuImg(tb testing.TB, args ...string) []byte {
	tb.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	require.NoError(tb, err, "qemu-img %v: %s", args, out)
	return out
}

func imgInfoOf(tb testing.TB, path string) map[string]any {
	tb.Helper()
	var m map[string]any
	require.NoError(tb, json.Unmarshal(qemuImg(tb, "info", "--output=json", path), &m))
	return m
}

// emptyStore opens an empty image store in a temp dir and writes two
// candidate bases beside it: a 64 MiB qcow2 and a 1 MiB raw file.
func emptyStore(t *testing.T) (st *Images, qcow, raw string) {
	t.Helper()
	src := t.TempDir()
	st, err := OpenImages(filepath.Join(t.TempDir(), "vm-images"), "")
	require.NoError(t, err)
	qcow = filepath.Join(src, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", qcow, "64M")
	raw = filepath.Join(src, "base.raw")
	require.NoError(t, os.WriteFile(raw, make([]byte, 1<<20), 0o644))
	return st, qcow, raw
}

func TestImagesImportListOverlayRemove(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, qcow, raw := emptyStore(t)
	src := filepath.Dir(qcow)
	kernel := filepath.Join(src, "vmlinuz")
	require.NoError(t, os.WriteFile(kernel, []byte("not really a kernel"), 0o644))

	a, err := st.Import(ctx, "guest-a", qcow, Boot{Kernel: kernel, Cmdline: "console=ttyS0"})
	require.NoError(t, err)
	require.Equal(t, "qcow2", a.Format)
	require.Equal(t, int64(64<<20), a.VirtualSize)
	require.Regexp(t, `^sha256:[0-9a-f]{64}$`, a.Digest)
	require.Equal(t, filepath.Join(st.Dir(), "guest-a", "kernel"), a.Kernel)
	require.Equal(t, "console=ttyS0", a.Cmdline)
	b, err := st.Import(ctx, "guest-b", raw, Boot{})
	require.NoError(t, err)
	require.Equal(t, "raw", b.Format)
	require.Equal(t, int64(1<<20), b.VirtualSize)
	require.Empty(t, b.Kernel)

	_, err = st.Import(ctx, "guest-a", raw, Boot{})
	require.ErrorIs(t, err, ErrImageExists)

	// The base is read-only and equal to its source.
	info, err := os.Stat(a.Path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o444), info.Mode().Perm())

	list, err := st.List()
	require.NoError(t, err)
	require.Len(t, list, 2)
	require.Equal(t, "guest-a", list[0].Name)
	require.Equal(t, a.Digest, list[0].Digest)

	// An overlay on each base: qcow2 backed by the base, nothing copied.
	for _, img := range []Image{a, b} {
		ov := filepath.Join(t.TempDir(), "disk.qcow2")
		require.NoError(t, st.Overlay(ctx, img, ov, 0))
		m := imgInfoOf(t, ov)
		require.Equal(t, "qcow2", m["format"])
		require.Equal(t, img.Path, m["backing-filename"])
		require.Equal(t, img.Format, m["backing-filename-format"])
		require.InDelta(t, float64(img.VirtualSize), m["virtual-size"], 0)
		fi, err := os.Stat(ov)
		require.NoError(t, err)
		require.Less(t, fi.Size(), int64(1<<20), "an overlay holds only metadata")
	}
	bigger := filepath.Join(t.TempDir(), "big.qcow2")
	require.NoError(t, st.Overlay(ctx, a, bigger, 2<<30))
	require.InDelta(t, float64(2<<30), imgInfoOf(t, bigger)["virtual-size"], 0)
	err = st.Overlay(ctx, a, filepath.Join(t.TempDir(), "small.qcow2"), 1<<20)
	require.ErrorIs(t, err, ErrImageInvalid)

	busy := errors.New("used by a VM")
	require.ErrorIs(t, st.Remove("guest-a", func(Image) error { return busy }), busy)
	_, err = st.Get("guest-a")
	require.NoError(t, err, "a refused removal leaves the image")
	require.NoError(t, st.Remove("guest-a", nil))
	_, err = st.Get("guest-a")
	require.ErrorIs(t, err, ErrImageNotFound)
	require.ErrorIs(t, st.Remove("guest-a", nil), ErrImageNotFound)
	list, err = st.List()
	require.NoError(t, err)
	require.Len(t, list, 1)
}

func TestImagesRefuseBadInput(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := t.TempDir()
	st, err := OpenImages(filepath.Join(t.TempDir(), "vm-images"), "")
	require.NoError(t, err)
	good := filepath.Join(src, "good.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", good, "16M")
	vdi := filepath.Join(src, "disk.vdi")
	qemuImg(t, "create", "-q", "-f", "vdi", vdi, "16M")
	child := filepath.Join(src, "child.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", good, "-F", "qcow2", child)

	for _, tc := range []struct {
		name, image, file string
		boot              Boot
		want              string
	}{
		{"unknown format", "x", vdi, Boot{}, `is "vdi"; a base image is qcow2 or raw`},
		{"missing file", "x", filepath.Join(src, "nope"), Boot{}, "no such file"},
		{"directory", "x", src, Boot{}, "not a regular file"},
		{"backing file", "x", child, Boot{}, "has a backing file of its own"},
		{"upper case name", "Guest", good, Boot{}, "use lowercase letters"},
		{"slash in name", "a/b", good, Boot{}, "use lowercase letters"},
		{"dot name", "..", good, Boot{}, "use lowercase letters"},
		{"empty name", "", good, Boot{}, "empty"},
		{"initrd without kernel", "x", good, Boot{Initrd: good}, "needs a kernel"},
		{"missing kernel", "x", good, Boot{Kernel: filepath.Join(src, "nokernel")}, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := st.Import(ctx, tc.image, tc.file, tc.boot)
			require.ErrorIs(t, err, ErrImageInvalid)
			require.ErrorContains(t, err, tc.want)
		})
	}
	list, err := st.List()
	require.NoError(t, err)
	require.Empty(t, list)
	ents, err := os.ReadDir(st.Dir())
	require.NoError(t, err)
	require.Empty(t, ents, "failed imports leave nothing behind")
}

// BenchmarkOverlayVsCopy compares creating a VM's disk as a qcow2 overlay
// on a 1 GiB base (by qemu-img, and taken from the overlay pool, filled
// off the clock) with copying the base, as a runtime without overlays
// would. The base holds 1 GiB of random data (no sparse shortcut for the
// copy).
func BenchmarkOverlayVsCopy(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	base := filepath.Join(dir, "base.raw")
	f, err := os.Create(base)
	require.NoError(b, err)
	_, err = io.CopyN(f, rand.Reader, 1<<30)
	require.NoError(b, err)
	require.NoError(b, f.Close())
	st, err := OpenImages(filepath.Join(dir, "store"), "")
	require.NoError(b, err)
	img, err := st.Import(ctx, "base", base, Boot{})
	require.NoError(b, err)
	require.NoError(b, os.Remove(base))

	b.Run("overlay", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			p := filepath.Join(dir, "ov.qcow2")
			require.NoError(b, st.Overlay(ctx, img, p, 0))
			require.NoError(b, os.Remove(p))
		}
	})
	b.Run("pooled", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			require.NoError(b, st.FillOverlays(ctx, img, 1)) // ahead, as the backend does after a start
			b.StartTimer()
			p := filepath.Join(dir, "ov.qcow2")
			ok, rejected := st.TakeOverlay(img, p)
			require.True(b, ok)
			require.Empty(b, rejected)
			b.StopTimer()
			require.NoError(b, os.Remove(p))
			b.StartTimer()
		}
	})
	b.Run("copy", func(b *testing.B) {
		b.SetBytes(img.FileSize)
		for b.Loop() {
			p := filepath.Join(dir, "copy.raw")
			in, err := os.Open(img.Path)
			require.NoError(b, err)
			out, err := os.Create(p)
			require.NoError(b, err)
			_, err = io.Copy(out, in)
			require.NoError(b, err)
			require.NoError(b, out.Sync())
			require.NoError(b, errors.Join(in.Close(), out.Close(), os.Remove(p)))
		}
	})
}
