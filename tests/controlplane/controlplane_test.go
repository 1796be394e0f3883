package controlplane

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/kubernetes"
)

func TestStart(t *testing.T) {
	begin := time.Now()
	env := Start(t)
	t.Logf("Start returned after %s (etcd + kube-apiserver + CRDs: %s)",
		time.Since(begin).Round(time.Millisecond), env.StartupTime.Round(time.Millisecond))

	t.Run("ServerVersion", func(t *testing.T) {
		dc, err := discovery.NewDiscoveryClientForConfig(env.Config)
		require.NoError(t, err)
		info, err := dc.ServerVersion()
		require.NoError(t, err)
		require.Equal(t, pinnedKubernetesVersion(t), info.GitVersion)
	})

	t.Run("ConfigMapRoundTrip", func(t *testing.T) {
		cs, err := kubernetes.NewForConfig(env.Config)
		require.NoError(t, err)
		ns := env.Namespace(t)

		want := &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: "greeting", Namespace: ns},
			Data:       map[string]string{"hello": "edge"},
		}
		_, err = cs.CoreV1().ConfigMaps(ns).Create(t.Context(), want, metav1.CreateOptions{})
		require.NoError(t, err)

		got, err := cs.CoreV1().ConfigMaps(ns).Get(t.Context(), "greeting", metav1.GetOptions{})
		require.NoError(t, err)
		require.Equal(t, want.Data, got.Data)
		require.NotEmpty(t, got.UID, "the apiserver assigns a UID")
		require.NotEmpty(t, got.ResourceVersion, "etcd assigns a resource version")
	})

	t.Run("StopIsIdempotent", func(t *testing.T) {
		// Runs last: the cleanup registered by Start stops it once more.
		require.NoError(t, env.Stop())
		require.NoError(t, env.Stop())
	})
}

func TestShared(t *testing.T) {
	var s Shared
	first := s.Env(t)
	require.Same(t, first, s.Env(t), "a second Env returns the same control plane")
	// Shared.Run is not used here because this package's TestMain is the
	// default one; stop by hand as Run would.
	require.NoError(t, first.Stop())
}

func TestMissingBinaries(t *testing.T) {
	t.Setenv(testbinEnv, t.TempDir())

	_, err := New()
	require.ErrorIs(t, err, ErrBinariesMissing)
	require.ErrorContains(t, err, "make testbin")

	// Start must fail the test, never skip it: a skipped integration test
	// looks green in CI.
	rec := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Start(rec)
	}()
	<-done
	require.False(t, rec.skipped, "Start skipped the test")
	require.Contains(t, rec.fatal, "make testbin")
}

// fatalRecorder is a testing.TB whose Fatal and Skip record and stop the
// calling goroutine, so a test can check how a helper gives up.
type fatalRecorder struct {
	testing.TB
	fatal   string
	skipped bool
}

func (r *fatalRecorder) Fatalf(format string, args ...any) {
	r.fatal = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func (r *fatalRecorder) Fatal(args ...any) {
	r.fatal = fmt.Sprint(args...)
	runtime.Goexit()
}

func (r *fatalRecorder) Skip(...any) { r.SkipNow() }

func (r *fatalRecorder) Skipf(string, ...any) { r.SkipNow() }

func (r *fatalRecorder) SkipNow() {
	r.skipped = true
	runtime.Goexit()
}

func TestFindRepoRoot(t *testing.T) {
	wd, err := os.Getwd()
	require.NoError(t, err)
	root, err := findRepoRoot(wd)
	require.NoError(t, err)
	require.Equal(t, filepath.Dir(filepath.Dir(wd)), root, "tests/controlplane is two levels below the root")

	// The nested build/testbin module must not be mistaken for the root.
	root, err = findRepoRoot(filepath.Join(root, "build", "testbin", "cmd"))
	require.NoError(t, err)
	require.Equal(t, filepath.Dir(filepath.Dir(wd)), root)

	_, err = findRepoRoot(t.TempDir())
	require.Error(t, err)
}

// pinnedKubernetesVersion reads the k8s.io/kubernetes version that
// build/testbin/go.mod pins, which is what kube-apiserver must report.
func pinnedKubernetesVersion(t *testing.T) string {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "build", "testbin", "go.mod"))
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "k8s.io/kubernetes" {
			return fields[1]
		}
	}
	require.NoError(t, sc.Err())
	t.Fatal("build/testbin/go.mod does not require k8s.io/kubernetes")
	return ""
}
