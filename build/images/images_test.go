package images_test

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/build/images"
)

// load reads the image tagged a.Ref from the archive.
func load(t *testing.T, a images.Archive) v1.Image {
	t.Helper()
	tag, err := name.NewTag(a.Ref)
	require.NoError(t, err)
	img, err := tarball.ImageFromPath(a.Path, &tag)
	require.NoError(t, err)
	return img
}

// entries lists the single layer of an archive: path -> header.
func entries(t *testing.T, a images.Archive) (*v1.ConfigFile, map[string]*tar.Header) {
	t.Helper()
	img := load(t, a)
	cfg, err := img.ConfigFile()
	require.NoError(t, err)
	layers, err := img.Layers()
	require.NoError(t, err)
	require.Len(t, layers, 1)
	rc, err := layers[0].Uncompressed()
	require.NoError(t, err)
	defer rc.Close()
	got := map[string]*tar.Header{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		got[h.Name] = h
	}
	return cfg, got
}

func TestBusyboxImage(t *testing.T) {
	a, err := images.Busybox(images.Config{CacheDir: t.TempDir()})
	require.NoError(t, err)
	require.Equal(t, images.BusyboxRef, a.Ref)
	cfg, files := entries(t, a)
	require.Equal(t, "linux", cfg.OS)
	require.Equal(t, []string{"sh"}, cfg.Config.Cmd)
	require.Contains(t, cfg.Config.Env, "PATH=/usr/sbin:/usr/bin:/sbin:/bin")

	require.Equal(t, byte(tar.TypeReg), files["bin/busybox"].Typeflag)
	require.Equal(t, int64(0o755), files["bin/busybox"].Mode)
	for _, applet := range []string{"bin/sh", "bin/echo", "bin/cat", "bin/sleep", "usr/bin/wget", "usr/bin/nc", "bin/ls", "sbin/ip", "usr/bin/env", "usr/sbin/httpd"} {
		h := files[applet]
		require.NotNil(t, h, "applet %s", applet)
		require.Equal(t, byte(tar.TypeSymlink), h.Typeflag, applet)
		require.Equal(t, "/bin/busybox", h.Linkname, applet)
	}
	require.Equal(t, int64(0o1777), files["tmp/"].Mode)
	require.Contains(t, files, "etc/passwd")
	require.Contains(t, files, "proc/")
}

func TestPauseImage(t *testing.T) {
	a, err := images.Pause(context.Background(), images.Config{CacheDir: t.TempDir()})
	require.NoError(t, err)
	require.Equal(t, images.PauseRef, a.Ref)
	cfg, files := entries(t, a)
	require.Equal(t, []string{"/pause"}, cfg.Config.Entrypoint)
	require.Equal(t, int64(0o755), files["pause"].Mode)
	require.Positive(t, files["pause"].Size)
}

// The cache is keyed by content: the same inputs give the same archive
// (built once, same image digest in another cache), a changed input a new
// one.
func TestCacheKeyedByContent(t *testing.T) {
	dir := t.TempDir()
	first, err := images.Busybox(images.Config{CacheDir: dir})
	require.NoError(t, err)
	st1, err := os.Stat(first.Path)
	require.NoError(t, err)
	again, err := images.Busybox(images.Config{CacheDir: dir})
	require.NoError(t, err)
	require.Equal(t, first.Path, again.Path)
	st2, err := os.Stat(again.Path)
	require.NoError(t, err)
	require.Equal(t, st1.ModTime(), st2.ModTime(), "not rewritten")

	elsewhere, err := images.Busybox(images.Config{CacheDir: t.TempDir()})
	require.NoError(t, err)
	require.Equal(t, filepath.Base(first.Path), filepath.Base(elsewhere.Path))
	require.Equal(t, digest(t, first), digest(t, elsewhere), "reproducible")

	// Another busybox binary (the same bytes plus one) is another archive.
	bin, err := os.ReadFile("/bin/busybox")
	require.NoError(t, err)
	other := filepath.Join(t.TempDir(), "busybox")
	require.NoError(t, os.WriteFile(other, append(bin, 0), 0o755))
	changed, err := images.Busybox(images.Config{CacheDir: dir, Busybox: other})
	require.NoError(t, err)
	require.NotEqual(t, first.Path, changed.Path)
	require.NotEqual(t, digest(t, first), digest(t, changed))
}

func digest(t *testing.T, a images.Archive) v1.Hash {
	t.Helper()
	d, err := load(t, a).Digest()
	require.NoError(t, err)
	return d
}

func TestMissingBusyboxIsAClearError(t *testing.T) {
	_, err := images.Busybox(images.Config{CacheDir: t.TempDir(), Busybox: filepath.Join(t.TempDir(), "none")})
	require.ErrorContains(t, err, "apt-get install busybox-static")
}
