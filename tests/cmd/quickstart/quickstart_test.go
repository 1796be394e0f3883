package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	cloudvm "github.com/tetheredge/tether/cloudcore/vm"
	edgevm "github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/tests/containerd"
)

// lines collects a process's output, line by line, for waiting on.
type lines struct {
	mu  sync.Mutex
	all []string
}

func (l *lines) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l.mu.Lock()
		l.all = append(l.all, sc.Text())
		l.mu.Unlock()
	}
}

func (l *lines) has(sub string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.all {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// after returns the first word after sub in the first line holding it.
func (l *lines) after(sub string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.all {
		if _, rest, ok := strings.Cut(s, sub); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				return f[0]
			}
		}
	}
	return ""
}

func (l *lines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.all, "\n")
}

// TestQuickstart runs `make run`'s quickstart itself, as a user does: the
// real binaries (built here from the tree), the control plane from
// _output/testbin, the guest from _output/guest, the kubectl of `make
// kubectl`. It waits for the printed milestones (node Ready, pod Running,
// VM booted), checks them in the API server, runs the printed kubectl
// command, then presses Ctrl-C (SIGINT to the quickstart) and checks that
// it stopped cleanly and left nothing running or mounted under its
// directory (the VMs' run directory included) or its containerd's, and
// that containerd's directory is gone.
func TestQuickstart(t *testing.T) {
	require.Equal(t, 0, os.Geteuid(), "the quickstart runs containerd and QEMU: run the test as root")
	root, err := repoRoot()
	require.NoError(t, err)
	kubectl := filepath.Join(root, "_output", "bin", "kubectl")
	_, err = os.Stat(kubectl)
	require.NoError(t, err, "kubectl missing: run `make kubectl`")

	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/", "./cloudcore/cmd/cloudcore", "./edgecore/cmd/edgecore", "./tests/cmd/quickstart")
	build.Dir = root
	out, err := build.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)

	// Not t.TempDir: the VMs' QMP sockets are under it (at most 107
	// bytes), and the test's name would lengthen it.
	dir, err := os.MkdirTemp("", "tqs-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	tunnel, join := freePort(t), freePort(t)
	qs := exec.Command(filepath.Join(bin, "quickstart"), "--dir", dir, "--bin", bin, "--kubectl", kubectl,
		"--tunnel-addr", tunnel, "--join-addr", join, "--cloud-metrics-addr", "0", "--edge-metrics-addr", "0")
	qs.Dir = root
	qs.Stderr = os.Stderr
	stdout, err := qs.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, qs.Start())
	var printed lines
	readDone := make(chan struct{})
	go func() { printed.read(stdout); close(readDone) }()
	exited := make(chan error, 1)
	go func() { <-readDone; exited <- qs.Wait() }()
	t.Cleanup(func() {
		if qs.ProcessState == nil {
			_ = qs.Process.Kill() // a failed test: Pdeathsig takes the rest
			<-exited
		}
		t.Logf("quickstart output:\n%s", printed.String())
	})

	node := "edge-1"
	for _, m := range []string{
		fmt.Sprintf(milestoneNodeReady, node),
		fmt.Sprintf(milestonePodRunning, sampleNS, samplePod),
		fmt.Sprintf(milestoneVMBooted, sampleNS, sampleVM),
		milestoneAllUp,
		"Press Ctrl-C",
	} {
		require.Eventually(t, func() bool {
			select {
			case err := <-exited:
				exited <- err
				return true // fails below
			default:
			}
			return printed.has(m)
		}, 15*time.Minute, 100*time.Millisecond, "waiting for %q", m)
		require.True(t, printed.has(m), "the quickstart exited before printing %q", m)
	}

	ctrd := printed.after(milestoneContainerd)
	require.True(t, strings.HasPrefix(ctrd, "/"), "the containerd directory is printed: %q", ctrd)

	// What it printed holds in the API server.
	kubeconfig := filepath.Join(dir, "kubeconfig")
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	require.NoError(t, err)
	cs, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(cfg)
	require.NoError(t, err)
	ctx := t.Context()
	pod, err := cs.CoreV1().Pods(sampleNS).Get(ctx, samplePod, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, corev1.PodRunning, pod.Status.Phase)
	require.Equal(t, node, pod.Spec.NodeName)
	v, err := cloudvm.NewClient(dyn).Get(ctx, sampleNS, sampleVM)
	require.NoError(t, err)
	require.Equal(t, cloudvm.PhaseRunning, v.Status.Phase)
	require.Contains(t, v.Status.Console, edgevm.BootMarker)
	require.NotNil(t, v.Status.BootTime)
	require.NotEmpty(t, qemusUnder(filepath.Join(dir, "vm")), "the VM's QEMU runs from the run directory")

	// The next command it prints works with the kubectl it names.
	kc, err := exec.CommandContext(ctx, kubectl, "--kubeconfig", kubeconfig, "get", "nodes,pods,vm,edgenodes", "-o", "wide").CombinedOutput()
	require.NoError(t, err, "kubectl: %s", kc)
	for _, want := range []string{node, samplePod, sampleVM, "Running"} {
		require.Contains(t, string(kc), want)
	}

	// Ctrl-C: an orderly stop that leaves nothing behind.
	require.NoError(t, qs.Process.Signal(syscall.SIGINT))
	select {
	case err := <-exited:
		require.NoError(t, err, "the quickstart's stop reported a problem")
	case <-time.After(10 * time.Minute):
		t.Fatal("the quickstart did not stop within 10 minutes of SIGINT")
	}
	require.True(t, printed.has("stopped: nothing of the quickstart is left running or mounted"))
	for _, d := range []string{dir, ctrd} {
		require.Empty(t, procsNaming(d), "processes left running")
		mounts, err := containerd.Mounts(d)
		require.NoError(t, err)
		require.Empty(t, mounts, "mounts left")
	}
	_, err = os.Stat(ctrd)
	require.ErrorIs(t, err, os.ErrNotExist, "containerd's directory is removed")
}

// freePort returns a loopback address whose port was free a moment ago
// for both TCP and UDP (the tunnel listens on both: WebSocket and QUIC).
func freePort(t *testing.T) string {
	t.Helper()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		addr := l.Addr().String()
		u, err := net.ListenPacket("udp", addr)
		require.NoError(t, l.Close())
		if err == nil {
			require.NoError(t, u.Close())
			return addr
		}
	}
	t.Fatal("no port free for both TCP and UDP in 100 tries")
	return ""
}

// procsNaming returns the command lines of the processes that name a file
// under dir: containerd, its shims, QEMU, EdgeCore and CloudCore all do.
func procsNaming(dir string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		if ent.Name() == "self" || ent.Name() == "thread-self" {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(raw), dir+"/") {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "stat")); err == nil && zombie(string(st)) {
			continue
		}
		out = append(out, ent.Name()+": "+strings.ReplaceAll(string(raw), "\x00", " "))
	}
	return out
}

func zombie(stat string) bool {
	i := strings.LastIndexByte(stat, ')')
	return i >= 0 && strings.HasPrefix(stat[i+1:], " Z")
}
