package pods

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The atomic writer of ConfigMap, Secret, projected and downwardAPI
// volumes: the layout and the update of kubelet's AtomicWriter
// (pkg/volume/util/atomic_writer.go), so that a container sees either all
// of a volume's old files or all of its new ones, never a mix.
//
//	<dir>/..2026_12_01_12_00_00.123456789/   the files, in their sub-directories
//	<dir>/..data -> ..2026_12_01_12_00_00.123456789
//	<dir>/<name> -> ..data/<name>            one per top-level name of the files
//
// An update writes a new timestamped directory, points a new symlink
// ..data_tmp at it and renames that over ..data: the one rename switches
// every file at once. Then the top-level links the new files need are made,
// the ones they no longer need removed, and the old directory removed.
// Paths whose first element starts with ".." are refused: they would clash
// with the writer's own names. The user-visible names are symlinks, so a
// container that wants a file's mode asks stat -L, as with kubelet.
//
// A directory written by the earlier writer (plain files, no ..data) is
// taken over: its plain entries are replaced by the links.

const (
	dataLink    = "..data"
	dataLinkTmp = "..data_tmp"
)

// writeAtomic makes dir show exactly files. It does nothing when the
// current timestamped directory already holds them, byte for byte and mode
// for mode.
func writeAtomic(dir string, files map[string]volumeFile) error {
	tops := map[string]bool{}
	for p := range files {
		top, _, _ := strings.Cut(p, string(filepath.Separator))
		if strings.HasPrefix(top, "..") {
			return fmt.Errorf("path %q: a first element starting with .. is reserved", p)
		}
		tops[top] = true
	}
	current, err := os.Readlink(filepath.Join(dir, dataLink))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read %s link: %w", dataLink, err)
	}
	if current == "" || !sameFiles(filepath.Join(dir, current), files) {
		if current, err = writeGeneration(dir, files); err != nil {
			return err
		}
	}
	if err := linkTops(dir, tops); err != nil {
		return err
	}
	return sweep(dir, tops, current)
}

// sameFiles reports whether gen holds exactly files.
func sameFiles(gen string, files map[string]volumeFile) bool {
	seen, differs := 0, false
	err := filepath.WalkDir(gen, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(gen, p)
		f, ok := files[rel]
		ok = ok && d.Type().IsRegular()
		if ok {
			info, err := d.Info()
			ok = err == nil && info.Mode().Perm() == f.mode
		}
		if ok {
			data, err := os.ReadFile(p)
			ok = err == nil && bytes.Equal(data, f.data)
		}
		if !ok {
			differs = true
			return fs.SkipAll
		}
		seen++
		return nil
	})
	return err == nil && !differs && seen == len(files)
}

// writeGeneration writes files into a new timestamped directory of dir and
// switches ..data to it. It returns the new directory's name.
func writeGeneration(dir string, files map[string]volumeFile) (string, error) {
	gen, err := os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05."))
	if err != nil {
		return "", fmt.Errorf("create volume data directory: %w", err)
	}
	name := filepath.Base(gen)
	err = os.Chmod(gen, 0o755)
	for p, f := range files {
		if err != nil {
			break
		}
		err = writeFile(filepath.Join(gen, p), f)
	}
	tmp := filepath.Join(dir, dataLinkTmp)
	if err == nil {
		if err = os.Remove(tmp); errors.Is(err, fs.ErrNotExist) {
			err = nil
		}
	}
	if err == nil {
		err = os.Symlink(name, tmp)
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, dataLink))
	}
	if err != nil {
		return "", errors.Join(fmt.Errorf("write volume data: %w", err), os.RemoveAll(gen))
	}
	return name, nil
}

func writeFile(path string, f volumeFile) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, f.mode)
	if err != nil {
		return err
	}
	_, werr := out.Write(f.data)
	// Chmod: the umask must not take bits away from the mode asked for.
	return errors.Join(werr, out.Chmod(f.mode), out.Close())
}

// linkTops makes each top-level name a symlink into ..data, replacing
// whatever else stands there.
func linkTops(dir string, tops map[string]bool) error {
	for top := range tops {
		path, target := filepath.Join(dir, top), filepath.Join(dataLink, top)
		if got, err := os.Readlink(path); err == nil && got == target {
			continue
		}
		if info, err := os.Lstat(path); err == nil && info.IsDir() {
			// A directory of the earlier writer: rename cannot replace it.
			if err := os.RemoveAll(path); err != nil {
				return fmt.Errorf("replace volume directory %s: %w", top, err)
			}
		}
		tmp := filepath.Join(dir, "..link_tmp")
		_ = os.Remove(tmp) // a leftover of an interrupted write
		if err := os.Symlink(target, tmp); err != nil {
			return fmt.Errorf("link volume path %s: %w", top, err)
		}
		if err := os.Rename(tmp, path); err != nil {
			return fmt.Errorf("link volume path %s: %w", top, err)
		}
	}
	return nil
}

// sweep removes what dir holds beyond the top-level links, ..data and the
// current generation: links the files no longer need, earlier
// generations, and leftovers of interrupted writes.
func sweep(dir string, tops map[string]bool, current string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read volume directory: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		if tops[name] || name == dataLink || name == current {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("remove stale volume entry %s: %w", name, err)
		}
	}
	return nil
}
