package pods

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Volumes live under <RootDir>/<pod uid>/volumes/<kind>/<name>. ConfigMap,
// Secret, projected and downwardAPI volumes are computed again on every
// sync and written with writeAtomic (kubelet's ..data symlink swap), so a
// changed object or pod, or a refreshed service-account token
// (tokens.go), reaches running containers, all files of a volume at
// once. Secret, projected and downwardAPI volumes, and emptyDirs with
// medium Memory, are tmpfs mounts, as kubelet makes them: a Secret's bytes
// never touch the disk outside the store.

// tmpfsKinds are the volume kinds that are tmpfs mounts (emptyDir only
// with medium Memory).
var tmpfsKinds = []string{"secret", "projected", "downward-api", "empty-dir"}

// volumeDir is the host directory of a pod's volume.
func (m *Manager) volumeDir(uid, kind, name string) string {
	return filepath.Join(m.cfg.RootDir, uid, "volumes", kind, name)
}

// prepareVolumes makes every volume of pod ready and returns the host path
// of each, by volume name, and when the first of its service-account
// tokens is to be refreshed (zero: none). A missing ConfigMap or Secret
// (or key) that is not optional is an error, and so is a token that
// cannot be had (a *tokenError): the containers wait.
func (m *Manager) prepareVolumes(ctx context.Context, pod *corev1.Pod, lookup lookupFunc) (map[string]string, time.Time, error) {
	paths := make(map[string]string, len(pod.Spec.Volumes))
	uid := string(pod.UID)
	var refresh time.Time
	for _, v := range pod.Spec.Volumes {
		var dir string
		var err error
		switch {
		case v.EmptyDir != nil:
			dir = m.volumeDir(uid, "empty-dir", v.Name)
			err = ensureDir(dir, 0o777, v.EmptyDir.Medium == corev1.StorageMediumMemory)
		case v.HostPath != nil:
			dir = v.HostPath.Path
			if t := v.HostPath.Type; t != nil && *t == corev1.HostPathDirectoryOrCreate {
				err = os.MkdirAll(dir, 0o755)
			}
		case v.ConfigMap != nil:
			dir = m.volumeDir(uid, "configmap", v.Name)
			err = writeVolume(dir, false, func() (map[string]volumeFile, error) {
				return objectFiles("ConfigMap", v.ConfigMap.Name, v.ConfigMap.Items, v.ConfigMap.DefaultMode, isTrue(v.ConfigMap.Optional), lookup)
			})
		case v.Secret != nil:
			dir = m.volumeDir(uid, "secret", v.Name)
			err = writeVolume(dir, true, func() (map[string]volumeFile, error) {
				return objectFiles("Secret", v.Secret.SecretName, v.Secret.Items, v.Secret.DefaultMode, isTrue(v.Secret.Optional), lookup)
			})
		case v.Projected != nil:
			dir = m.volumeDir(uid, "projected", v.Name)
			token := func(src *corev1.ServiceAccountTokenProjection) (string, error) {
				tok, at, err := m.tokens.token(ctx, pod, v.Name, src)
				if err == nil && (refresh.IsZero() || at.Before(refresh)) {
					refresh = at
				}
				return tok, err
			}
			err = writeVolume(dir, true, func() (map[string]volumeFile, error) {
				return projectedFiles(pod, v.Projected, m.cfg.Allocatable, lookup, token)
			})
		case v.DownwardAPI != nil:
			dir = m.volumeDir(uid, "downward-api", v.Name)
			err = writeVolume(dir, true, func() (map[string]volumeFile, error) {
				return downwardFiles(pod, v.DownwardAPI.Items, v.DownwardAPI.DefaultMode, m.cfg.Allocatable)
			})
		default:
			err = errors.New("only emptyDir, hostPath, configMap, secret, projected and downwardAPI volumes are supported")
		}
		if err != nil {
			return nil, time.Time{}, fmt.Errorf("volume %s: %w", v.Name, err)
		}
		paths[v.Name] = dir
	}
	return paths, refresh, nil
}

// writeVolume computes a volume's files and writes them into dir (a tmpfs
// when onTmpfs) with writeAtomic. Nothing is written when files fails.
func writeVolume(dir string, onTmpfs bool, files func() (map[string]volumeFile, error)) error {
	f, err := files()
	if err != nil {
		return err
	}
	if err := ensureDir(dir, 0o755, onTmpfs); err != nil {
		return err
	}
	return writeAtomic(dir, f)
}

// volumeFile is one file of a projected volume.
type volumeFile struct {
	data []byte
	mode os.FileMode
}

// volumeFiles maps an object's data to files: every key, or the items
// asked for, with their modes (default 0644). Paths must be relative and
// stay inside the volume.
func volumeFiles(data map[string]string, items []corev1.KeyToPath, defaultMode *int32, optional bool) (map[string]volumeFile, error) {
	mode := fileMode(defaultMode)
	files := map[string]volumeFile{}
	if len(items) == 0 {
		for k, v := range data {
			if err := checkPath(k); err != nil {
				return nil, err
			}
			files[k] = volumeFile{data: []byte(v), mode: mode}
		}
		return files, nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional {
				continue
			}
			return nil, fmt.Errorf("key %q not found", it.Key)
		}
		if err := checkPath(it.Path); err != nil {
			return nil, err
		}
		m := mode
		if it.Mode != nil {
			m = fileMode(it.Mode)
		}
		files[filepath.Clean(it.Path)] = volumeFile{data: []byte(v), mode: m}
	}
	return files, nil
}

func checkPath(p string) error {
	c := filepath.Clean(p)
	if p == "" || filepath.IsAbs(p) || c == ".." || strings.HasPrefix(c, "../") {
		return fmt.Errorf("path %q leaves the volume", p)
	}
	return nil
}

// ensureDir creates dir, and mounts a tmpfs on it when tmpfs is set and
// none is mounted there yet.
func ensureDir(dir string, mode os.FileMode, tmpfs bool) error {
	if err := os.MkdirAll(dir, mode); err != nil {
		return fmt.Errorf("create volume directory: %w", err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		return fmt.Errorf("set volume directory mode: %w", err)
	}
	if !tmpfs {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("statfs volume directory: %w", err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		return nil
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs on %s: %w", dir, err)
	}
	return nil
}

// removeVolumes unmounts the tmpfs volumes of pod uid and removes its
// directory.
func (m *Manager) removeVolumes(uid string) error {
	if uid == "" || checkPath(uid) != nil || strings.Contains(uid, "/") {
		return fmt.Errorf("remove volumes: bad pod uid %q", uid)
	}
	root := filepath.Join(m.cfg.RootDir, uid)
	for _, kind := range tmpfsKinds {
		dirs, _ := os.ReadDir(filepath.Join(root, "volumes", kind))
		for _, d := range dirs {
			p := filepath.Join(root, "volumes", kind, d.Name())
			if err := unix.Unmount(p, 0); err != nil && !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("unmount volume %s: %w", p, err)
			}
		}
	}
	if err := os.RemoveAll(root); err != nil {
		return fmt.Errorf("remove volumes: %w", err)
	}
	return nil
}

// containerMounts are the CRI mounts of c's volumeMounts. A subPathExpr
// is expanded against the container's env (every $(VAR) it names must be
// set and not empty, as kubelet requires) and is then a subPath.
func containerMounts(pod *corev1.Pod, c *corev1.Container, paths map[string]string, env []*runtimeapi.KeyValue) ([]*runtimeapi.Mount, error) {
	readOnly := map[string]bool{}
	for _, v := range pod.Spec.Volumes {
		readOnly[v.Name] = v.ConfigMap != nil || v.Secret != nil || v.Projected != nil || v.DownwardAPI != nil
	}
	var out []*runtimeapi.Mount
	for _, vm := range c.VolumeMounts {
		host, ok := paths[vm.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %s: no such volume", vm.Name)
		}
		sub := vm.SubPath
		if vm.SubPathExpr != "" {
			var err error
			if sub, err = expandSubPath(vm.SubPathExpr, env); err != nil {
				return nil, fmt.Errorf("volumeMount %s: subPathExpr %q: %w", vm.Name, vm.SubPathExpr, err)
			}
		}
		if sub != "" {
			if err := checkPath(sub); err != nil {
				return nil, fmt.Errorf("volumeMount %s: %w", vm.Name, err)
			}
			host = filepath.Join(host, sub)
		}
		out = append(out, &runtimeapi.Mount{
			ContainerPath: vm.MountPath,
			HostPath:      host,
			Readonly:      vm.ReadOnly || readOnly[vm.Name],
		})
	}
	return out, nil
}
