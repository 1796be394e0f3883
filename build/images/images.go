// Package images writes the container images Tether's runtime tests and the
// local run use, as docker image archives that `ctr images import` (and any
// CRI runtime's import) reads. There is no registry here, so every image is
// built from what the machine has:
//
//   - PauseRef, the sandbox image: the static Go program in pause/ built with
//     CGO_ENABLED=0, alone in one layer, entrypoint /pause.
//   - BusyboxRef, the workload image: Debian's static /bin/busybox with a
//     symlink for every applet it lists (sh, echo, cat, sleep, wget, nc, ls,
//     env, httpd, ...), /etc/passwd and /etc/group for root and nobody, and
//     the usual empty mount points; command sh.
//
// Archives are cached under Config.CacheDir, named by a digest of everything
// that goes into them (source or binary, Go version, architecture, layout
// version), so each is built once per change and concurrent builders (test
// binaries of several packages) never see a half-written file. The package
// only writes files: it never talks to containerd.
package images

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed" // the pause source
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

const (
	// PauseRef names the sandbox image (containerd's sandbox_image).
	PauseRef = "tether.local/pause:1"
	// BusyboxRef names the busybox workload image.
	BusyboxRef = "tether.local/busybox:1"

	// layout is bumped whenever what goes into an image changes in a way
	// the cache key does not see (file modes, config fields, paths).
	layout = "1"

	// PATH inside the busybox image, matching the applet paths.
	busyboxPath = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
)

//go:embed pause/main.go
var pauseSource []byte

// Config says where images are built from and cached. The zero value works
// on a Debian machine with busybox-static and Go, inside the module.
type Config struct {
	// CacheDir keeps the archives. "" means <module root>/_output/images,
	// the module root found by walking up from the working directory to
	// go.mod; outside a module, the user cache directory's tether/images.
	CacheDir string
	// Busybox is a statically linked busybox binary. "" means /bin/busybox
	// (Debian's busybox-static).
	Busybox string
	// Go is the go command that builds the pause binary. "" means "go" from
	// PATH.
	Go string
}

// Archive is one image archive on disk.
type Archive struct {
	// Ref is the image name the archive is tagged with.
	Ref string
	// Path is the archive file, a docker image tarball.
	Path string
}

// All builds (or finds in the cache) every image: the pause image first.
func All(ctx context.Context, cfg Config) ([]Archive, error) {
	pause, err := Pause(ctx, cfg)
	if err != nil {
		return nil, err
	}
	busybox, err := Busybox(cfg)
	if err != nil {
		return nil, err
	}
	return []Archive{pause, busybox}, nil
}

// Pause returns the archive of PauseRef, building it when the cache has no
// archive for the current pause source and Go version.
func Pause(ctx context.Context, cfg Config) (Archive, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return Archive{}, err
	}
	path := cachePath(cfg.CacheDir, "pause", pauseSource, []byte(runtime.Version()))
	if exists(path) {
		return Archive{Ref: PauseRef, Path: path}, nil
	}
	bin, err := buildPause(ctx, cfg.Go)
	if err != nil {
		return Archive{}, err
	}
	var l layer
	l.dir("dev", 0o755)
	l.dir("proc", 0o755)
	l.dir("sys", 0o755)
	l.file("pause", 0o755, bin)
	if err := write(path, PauseRef, v1.Config{Entrypoint: []string{"/pause"}}, &l); err != nil {
		return Archive{}, err
	}
	return Archive{Ref: PauseRef, Path: path}, nil
}

// Busybox returns the archive of BusyboxRef, building it when the cache has
// no archive for this busybox binary.
func Busybox(cfg Config) (Archive, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return Archive{}, err
	}
	bin, err := os.ReadFile(cfg.Busybox)
	if err != nil {
		return Archive{}, fmt.Errorf("read busybox (apt-get install busybox-static): %w", err)
	}
	path := cachePath(cfg.CacheDir, "busybox", bin)
	if exists(path) {
		return Archive{Ref: BusyboxRef, Path: path}, nil
	}
	applets, err := busyboxApplets(cfg.Busybox)
	if err != nil {
		return Archive{}, err
	}
	var l layer
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "etc", "proc", "sys", "run", "var", "home"} {
		l.dir(d, 0o755)
	}
	l.dir("tmp", 0o1777)
	l.dir("root", 0o700)
	l.file("bin/busybox", 0o755, bin)
	l.file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"))
	l.file("etc/group", 0o644, []byte("root:x:0:\nnogroup:x:65534:\n"))
	for _, a := range applets {
		if a == "bin/busybox" {
			continue
		}
		l.symlink(a, "/bin/busybox")
	}
	if err := write(path, BusyboxRef, v1.Config{Cmd: []string{"sh"}, Env: []string{busyboxPath}}, &l); err != nil {
		return Archive{}, err
	}
	return Archive{Ref: BusyboxRef, Path: path}, nil
}

func (c Config) withDefaults() (Config, error) {
	if c.Busybox == "" {
		c.Busybox = "/bin/busybox"
	}
	if c.Go == "" {
		c.Go = "go"
	}
	if c.CacheDir == "" {
		dir, err := defaultCacheDir()
		if err != nil {
			return c, err
		}
		c.CacheDir = dir
	}
	if err := os.MkdirAll(c.CacheDir, 0o755); err != nil {
		return c, fmt.Errorf("create image cache: %w", err)
	}
	return c, nil
}

func defaultCacheDir() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find image cache: %w", err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if exists(filepath.Join(d, "go.mod")) {
			return filepath.Join(d, "_output", "images"), nil
		}
		if filepath.Dir(d) == d {
			break
		}
	}
	user, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("find image cache: %w", err)
	}
	return filepath.Join(user, "tether", "images"), nil
}

// cachePath names an archive by its kind and a digest of its inputs.
func cachePath(dir, kind string, inputs ...[]byte) string {
	h := sha256.New()
	for _, in := range append([][]byte{[]byte(layout), []byte(runtime.GOARCH)}, inputs...) {
		fmt.Fprintf(h, "%d:", len(in))
		h.Write(in)
	}
	return filepath.Join(dir, kind+"-"+hex.EncodeToString(h.Sum(nil))[:16]+".tar")
}

// buildPause compiles pause/main.go on its own (a throwaway module in a
// temporary directory), static and stripped.
func buildPause(ctx context.Context, goCmd string) ([]byte, error) {
	dir, err := os.MkdirTemp("", "tether-pause-")
	if err != nil {
		return nil, fmt.Errorf("build pause: %w", err)
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "main.go"), pauseSource, 0o644); err != nil {
		return nil, fmt.Errorf("build pause: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module pause\n"), 0o644); err != nil {
		return nil, fmt.Errorf("build pause: %w", err)
	}
	cmd := exec.CommandContext(ctx, goCmd, "build", "-trimpath", "-ldflags=-s -w", "-o", "pause", ".")
	cmd.Dir = dir
	// GOFLAGS of the caller (-race, -mod=...) must not reach this build.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=", "GOWORK=off", "GOTOOLCHAIN=local")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build pause: %w: %s", err, bytes.TrimSpace(out))
	}
	bin, err := os.ReadFile(filepath.Join(dir, "pause"))
	if err != nil {
		return nil, fmt.Errorf("build pause: %w", err)
	}
	return bin, nil
}

// busyboxApplets lists the applets' paths relative to / (usr/bin/wget).
func busyboxApplets(bin string) ([]string, error) {
	out, err := exec.Command(bin, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("list busybox applets: %w", err)
	}
	var applets []string
	for _, a := range strings.Fields(string(out)) {
		a = strings.TrimPrefix(a, "/")
		if a == "" || strings.Contains(a, "..") {
			continue
		}
		applets = append(applets, a)
	}
	if len(applets) == 0 {
		return nil, errors.New("list busybox applets: busybox --list-full printed none")
	}
	sort.Strings(applets)
	return applets, nil
}

// write writes a one-layer image as a docker archive tagged ref, through a
// temporary file renamed into place so readers only ever see whole archives.
func write(path, ref string, cfg v1.Config, content *layer) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return fmt.Errorf("parse image name %s: %w", ref, err)
	}
	layerTar, err := content.bytes()
	if err != nil {
		return fmt.Errorf("make layer of %s: %w", ref, err)
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return fmt.Errorf("make layer of %s: %w", ref, err)
	}
	img, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           "linux",
		Config:       cfg,
		RootFS:       v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return fmt.Errorf("make config of %s: %w", ref, err)
	}
	if img, err = mutate.AppendLayers(img, l); err != nil {
		return fmt.Errorf("add layer to %s: %w", ref, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*.tar")
	if err != nil {
		return fmt.Errorf("write image %s: %w", ref, err)
	}
	defer os.Remove(tmp.Name())
	if err := tarball.Write(tag, img, tmp); err != nil {
		tmp.Close()
		return fmt.Errorf("write image %s: %w", ref, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write image %s: %w", ref, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("write image %s: %w", ref, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write image %s: %w", ref, err)
	}
	return nil
}

// layer builds a layer tarball in memory, owned by root, with a fixed
// modification time so the same inputs give the same digest. The first
// error sticks and is returned by bytes.
type layer struct {
	buf bytes.Buffer
	tw  *tar.Writer
	err error
}

func (l *layer) hdr(h *tar.Header, body []byte) {
	if l.tw == nil {
		l.tw = tar.NewWriter(&l.buf)
	}
	if l.err != nil {
		return
	}
	h.Format = tar.FormatPAX
	if l.err = l.tw.WriteHeader(h); l.err == nil && body != nil {
		_, l.err = l.tw.Write(body)
	}
	if l.err != nil {
		l.err = fmt.Errorf("write layer entry %s: %w", h.Name, l.err)
	}
}

func (l *layer) dir(p string, mode int64) {
	l.hdr(&tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: mode}, nil)
}

func (l *layer) file(p string, mode int64, body []byte) {
	l.hdr(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(body))}, body)
}

func (l *layer) symlink(p, target string) {
	l.hdr(&tar.Header{Typeflag: tar.TypeSymlink, Name: p, Linkname: target, Mode: 0o777}, nil)
}

func (l *layer) bytes() ([]byte, error) {
	if l.tw == nil {
		l.tw = tar.NewWriter(&l.buf)
	}
	if l.err != nil {
		return nil, l.err
	}
	if err := l.tw.Close(); err != nil {
		return nil, fmt.Errorf("close layer: %w", err)
	}
	return l.buf.Bytes(), nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
