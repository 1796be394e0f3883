package controlplane

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

const (
	// rootModule is the module path of the repository root's go.mod.
	rootModule = "github.com/tetheredge/tether"
	// testbinEnv names a directory holding kube-apiserver and etcd (and
	// kube-controller-manager, for WithControllerManager) to use instead
	// of <repo>/_output/testbin.
	testbinEnv = "TETHER_TESTBIN"
)

// ErrBinariesMissing reports that kube-apiserver or etcd (or a
// kube-controller-manager asked for) has not been built.
var ErrBinariesMissing = errors.New("controlplane: test binaries missing")

// paths locates what a control plane is started from.
type paths struct {
	binDir    string // directory holding the binaries
	apiServer string // kube-apiserver binary
	etcd      string // etcd binary
	crdDir    string // directory of CRD manifests to install
	// controllerManager is the kube-controller-manager binary, checked
	// only when a controller manager is asked for.
	controllerManager string
}

// findPaths finds the repository root from the working directory (go test
// runs a test binary in its package's directory) and the binaries in
// TETHER_TESTBIN or <repo>/_output/testbin.
func findPaths(withControllerManager bool) (paths, error) {
	wd, err := os.Getwd()
	if err != nil {
		return paths{}, fmt.Errorf("controlplane: get working directory: %w", err)
	}
	root, err := findRepoRoot(wd)
	if err != nil {
		return paths{}, err
	}
	p := paths{
		binDir: filepath.Join(root, "_output", "testbin"),
		crdDir: filepath.Join(root, "build", "crds"),
	}
	if dir := os.Getenv(testbinEnv); dir != "" {
		if p.binDir, err = filepath.Abs(dir); err != nil {
			return paths{}, fmt.Errorf("controlplane: resolve %s=%q: %w", testbinEnv, dir, err)
		}
	}
	p.apiServer = filepath.Join(p.binDir, "kube-apiserver")
	p.etcd = filepath.Join(p.binDir, "etcd")
	p.controllerManager = filepath.Join(p.binDir, "kube-controller-manager")
	bins := []string{p.apiServer, p.etcd}
	if withControllerManager {
		bins = append(bins, p.controllerManager)
	}
	for _, bin := range bins {
		if err := checkExecutable(bin); err != nil {
			return paths{}, fmt.Errorf("%w: %w; run `make testbin` (bash build/testbin/build.sh) "+
				"to build kube-apiserver, kube-controller-manager and etcd into %s, or set %s to a directory that holds them",
				ErrBinariesMissing, err, filepath.Join(root, "_output", "testbin"), testbinEnv)
		}
	}
	return p, nil
}

// checkExecutable reports why path is not an executable regular file.
func checkExecutable(path string) error {
	info, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	if !info.Mode().IsRegular() || info.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", path)
	}
	return nil
}

// findRepoRoot walks up from dir to the directory whose go.mod declares
// rootModule. Nested modules such as build/testbin are passed over.
func findRepoRoot(dir string) (string, error) {
	for d := dir; ; {
		module, err := modulePath(filepath.Join(d, "go.mod"))
		if err != nil {
			return "", err
		}
		if module == rootModule {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("controlplane: no go.mod of module %s in %s or above", rootModule, dir)
		}
		d = parent
	}
}

// modulePath returns the module path declared by the go.mod file at path, or
// "" if there is no such file.
func modulePath(path string) (string, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("controlplane: open %s: %w", path, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "module" {
			return strings.Trim(fields[1], `"`+"`"), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("controlplane: read %s: %w", path, err)
	}
	return "", nil
}
