package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The edge image store: base images of virtual machines under one
// directory, one subdirectory per image name:
//
//	DIR/NAME/image.json   the Image record below (written last, by rename)
//	DIR/NAME/disk         the base, qcow2 or raw, read-only (0444)
//	DIR/NAME/kernel       optional, for direct kernel boot
//	DIR/NAME/initrd       optional
//
// A VM never writes its base: each gets a qcow2 overlay whose backing file
// is DIR/NAME/disk (Overlay), so creating a VM copies nothing. Import
// reflinks the file where the filesystem can (FICLONE: btrfs, XFS) and
// copies it otherwise, hashing it on the way; it never hardlinks, since
// the source could then change the base under running VMs.

// ErrImageNotFound is wrapped by the errors of the store about an image it
// does not hold.
var ErrImageNotFound = errors.New("vm: image not found")

// ErrImageInvalid is wrapped by the errors about bad input: a bad name, a
// missing or unreadable file, a format other than qcow2 or raw, a qcow2
// with a backing file of its own.
var ErrImageInvalid = errors.New("vm: invalid image")

// ErrImageExists is returned by Import for a name already imported.
var ErrImageExists = errors.New("vm: image already imported")

// Image is one base image of the store.
type Image struct {
	// Name is the name pods use as their container image.
	Name string `json:"name"`
	// Digest is "sha256:" and the hex SHA-256 of the base file.
	Digest string `json:"digest"`
	// Format is "qcow2" or "raw", as qemu-img info reads it.
	Format string `json:"format"`
	// VirtualSize is the disk size the guest sees, in bytes.
	VirtualSize int64 `json:"virtualSize"`
	// FileSize is the base file's size on the host, in bytes.
	FileSize int64 `json:"fileSize"`
	// Kernel and Initrd are the image's direct-boot files (paths in the
	// store), empty when the guest boots from its disk.
	Kernel string `json:"kernel,omitempty"`
	Initrd string `json:"initrd,omitempty"`
	// Cmdline is the kernel command line of a direct kernel boot.
	Cmdline string `json:"cmdline,omitempty"`
	// ImportedAt is when Import finished.
	ImportedAt time.Time `json:"importedAt"`
	// Path is the base file (not stored: derived from the store's
	// directory).
	Path string `json:"-"`
}

// Boot is the optional direct-kernel-boot part of an import.
type Boot struct {
	// Kernel and Initrd are files to copy into the store; Initrd needs
	// Kernel.
	Kernel, Initrd string
	// Cmdline is the kernel command line; it needs Kernel.
	Cmdline string
}

// Images is the edge image store. Its methods are safe for concurrent
// use; two processes must not import into one directory at once.
type Images struct {
	dir     string
	qemuImg string

	mu sync.Mutex // serialises Import and Remove
}

// maxNameLen bounds an image name.
const maxNameLen = 128

var imageName = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)

// CheckImageName returns an error naming the rule a bad image name breaks:
// lowercase letters, digits, '.', '_' and '-', starting with a letter or a
// digit, at most 128 bytes.
func CheckImageName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: the image name is empty", ErrImageInvalid)
	case len(name) > maxNameLen:
		return fmt.Errorf("%w: image name is %d bytes, limit %d", ErrImageInvalid, len(name), maxNameLen)
	case !imageName.MatchString(name):
		return fmt.Errorf("%w: image name %q: use lowercase letters, digits, '.', '_' and '-', starting with a letter or a digit", ErrImageInvalid, name)
	}
	return nil
}

// OpenImages opens (creating it if needed) the image store in dir (made
// absolute), using the qemu-img binary qemuImg ("" : "qemu-img" from
// PATH).
func OpenImages(dir, qemuImg string) (*Images, error) {
	if dir == "" {
		return nil, errors.New("vm: an image directory is required")
	}
	if qemuImg == "" {
		qemuImg = "qemu-img"
	}
	// Absolute: an overlay names its base by this path, and qemu would
	// read a relative one from the overlay's own directory.
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolve image directory: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create image directory: %w", err)
	}
	return &Images{dir: dir, qemuImg: qemuImg}, nil
}

// Dir is the store's directory.
func (s *Images) Dir() string { return s.dir }

// Import copies file into the store as image name, with its digest, format
// and virtual size, and the direct-boot files of boot. The name must be
// new (ErrImageExists). Nothing is left behind on failure.
func (s *Images) Import(ctx context.Context, name, file string, boot Boot) (Image, error) {
	if err := CheckImageName(name); err != nil {
		return Image{}, err
	}
	if boot.Kernel == "" && (boot.Initrd != "" || boot.Cmdline != "") {
		return Image{}, fmt.Errorf("%w: an initrd or a kernel command line needs a kernel", ErrImageInvalid)
	}
	for _, f := range []string{file, boot.Kernel, boot.Initrd} {
		if f == "" {
			continue
		}
		if info, err := os.Stat(f); err != nil {
			return Image{}, fmt.Errorf("%w: %w", ErrImageInvalid, err)
		} else if !info.Mode().IsRegular() {
			return Image{}, fmt.Errorf("%w: %s is not a regular file", ErrImageInvalid, f)
		}
	}
	info, err := s.info(ctx, file)
	if err != nil {
		return Image{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	final := filepath.Join(s.dir, name)
	if _, err := os.Stat(final); err == nil {
		return Image{}, fmt.Errorf("%w: %q", ErrImageExists, name)
	}
	tmp, err := os.MkdirTemp(s.dir, ".import-"+name+"-")
	if err != nil {
		return Image{}, fmt.Errorf("create import directory: %w", err)
	}
	done := false
	defer func() {
		if !done {
			_ = os.RemoveAll(tmp)
		}
	}()
	sum, size, err := cloneFile(file, filepath.Join(tmp, "disk"))
	if err != nil {
		return Image{}, fmt.Errorf("copy base image: %w", err)
	}
	img := Image{
		Name: name, Digest: "sha256:" + sum, Format: info.Format, VirtualSize: info.VirtualSize,
		FileSize: size, Cmdline: boot.Cmdline, ImportedAt: time.Now().UTC(),
	}
	if boot.Kernel != "" {
		if _, _, err := cloneFile(boot.Kernel, filepath.Join(tmp, "kernel")); err != nil {
			return Image{}, fmt.Errorf("copy kernel: %w", err)
		}
		img.Kernel = "kernel"
	}
	if boot.Initrd != "" {
		if _, _, err := cloneFile(boot.Initrd, filepath.Join(tmp, "initrd")); err != nil {
			return Image{}, fmt.Errorf("copy initrd: %w", err)
		}
		img.Initrd = "initrd"
	}
	data, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return Image{}, fmt.Errorf("encode image record: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "image.json"), data, 0o444); err != nil {
		return Image{}, fmt.Errorf("write image record: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return Image{}, fmt.Errorf("install image: %w", err)
	}
	done = true
	return s.resolve(img), nil
}

// Get returns the image called name, or an error wrapping
// ErrImageNotFound.
func (s *Images) Get(name string) (Image, error) {
	if err := CheckImageName(name); err != nil {
		return Image{}, fmt.Errorf("%w: %w", ErrImageNotFound, err)
	}
	data, err := os.ReadFile(filepath.Join(s.dir, name, "image.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return Image{}, fmt.Errorf("%w: %q (import it with edgecore vm-image import)", ErrImageNotFound, name)
	}
	if err != nil {
		return Image{}, fmt.Errorf("read image %q: %w", name, err)
	}
	var img Image
	if err := json.Unmarshal(data, &img); err != nil {
		return Image{}, fmt.Errorf("decode image %q: %w", name, err)
	}
	if img.Name != name {
		return Image{}, fmt.Errorf("read image %q: its record names %q", name, img.Name)
	}
	return s.resolve(img), nil
}

// resolve turns the record's store-relative file names into paths.
func (s *Images) resolve(img Image) Image {
	d := filepath.Join(s.dir, img.Name)
	img.Path = filepath.Join(d, "disk")
	if img.Kernel != "" {
		img.Kernel = filepath.Join(d, img.Kernel)
	}
	if img.Initrd != "" {
		img.Initrd = filepath.Join(d, img.Initrd)
	}
	return img
}

// List returns every image, by name. Entries that are not images (an
// import in progress or left by a crash) are skipped.
func (s *Images) List() ([]Image, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []Image
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		img, err := s.Get(e.Name())
		if errors.Is(err, ErrImageNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, img)
	}
	return out, nil
}

// Remove deletes image name. inUse, when set, is asked under the store's
// lock and refuses the removal with its error (a VM's overlay still backs
// onto the image).
func (s *Images) Remove(name string, inUse func(Image) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	img, err := s.Get(name)
	if err != nil {
		return err
	}
	if inUse != nil {
		if err := inUse(img); err != nil {
			return err
		}
	}
	// Rename first, so that a crash halfway leaves no half image under its
	// name.
	gone := filepath.Join(s.dir, ".remove-"+name)
	if err := os.Rename(filepath.Join(s.dir, name), gone); err != nil {
		return fmt.Errorf("remove image %q: %w", name, err)
	}
	if err := os.RemoveAll(gone); err != nil {
		return fmt.Errorf("remove image %q: %w", name, err)
	}
	return nil
}

// Overlay creates a qcow2 overlay at path whose backing file is img's base
// (qemu-img create -f qcow2 -b BASE -F FORMAT PATH [SIZE]). size 0 keeps
// the base's virtual size; a smaller size than the base's is refused.
func (s *Images) Overlay(ctx context.Context, img Image, path string, size int64) error {
	if size != 0 && size < img.VirtualSize {
		return fmt.Errorf("%w: disk size %d is smaller than image %q (%d bytes)", ErrImageInvalid, size, img.Name, img.VirtualSize)
	}
	args := []string{"create", "-q", "-f", "qcow2", "-b", img.Path, "-F", img.Format, path}
	if size != 0 {
		args = append(args, strconv.FormatInt(size, 10))
	}
	if out, err := exec.CommandContext(ctx, s.qemuImg, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("create overlay: %s: %w", bytes.TrimSpace(out), err)
	}
	return nil
}

// imgInfo is the part of `qemu-img info --output=json` the store reads.
type imgInfo struct {
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	BackingFilename string `json:"backing-filename"`
}

// info reads and checks a candidate base image.
func (s *Images) info(ctx context.Context, file string) (imgInfo, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, s.qemuImg, "info", "--output=json", file)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return imgInfo{}, fmt.Errorf("%w: qemu-img info %s: %s: %w", ErrImageInvalid, file, bytes.TrimSpace(stderr.Bytes()), err)
	}
	var info imgInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return imgInfo{}, fmt.Errorf("decode qemu-img info: %w", err)
	}
	switch {
	case !slices.Contains([]string{"qcow2", "raw"}, info.Format):
		return imgInfo{}, fmt.Errorf("%w: %s is %q; a base image is qcow2 or raw", ErrImageInvalid, file, info.Format)
	case info.BackingFilename != "":
		return imgInfo{}, fmt.Errorf("%w: %s has a backing file of its own (%s); flatten it with qemu-img convert", ErrImageInvalid, file, info.BackingFilename)
	case info.VirtualSize <= 0:
		return imgInfo{}, fmt.Errorf("%w: %s has no size", ErrImageInvalid, file)
	}
	return info, nil
}

// cloneFile copies src to a new read-only file dst, by reflink where the
// filesystem has it, and returns the hex SHA-256 and the size of what it
// wrote.
func cloneFile(src, dst string) (sum string, size int64, err error) {
	in, err := os.Open(src)
	if err != nil {
		return "", 0, err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", 0, err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	}()
	h := sha256.New()
	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
		size, err = io.Copy(h, in)
	} else {
		size, err = io.Copy(io.MultiWriter(out, h), in)
	}
	if err != nil {
		return "", 0, err
	}
	if err := out.Sync(); err != nil {
		return "", 0, err
	}
	if err := out.Chmod(0o444); err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), size, nil
}
