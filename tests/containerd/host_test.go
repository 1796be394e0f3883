package containerd_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/tests/containerd"
)

// runPod runs a sandbox and one started container in it.
func runPod(ctx context.Context, t *testing.T, h *containerd.Host, sb *runtimeapi.PodSandboxConfig, c *runtimeapi.ContainerConfig) (podID, ctrID string) {
	t.Helper()
	podID, err := h.Runtime.RunPodSandbox(ctx, sb, "")
	require.NoError(t, err)
	ctrID, err = h.Runtime.CreateContainer(ctx, podID, c, sb)
	require.NoError(t, err)
	require.NoError(t, h.Runtime.StartContainer(ctx, ctrID))
	return podID, ctrID
}

// testContext bounds a test and silences the klog output of cri-client
// (errors are returned to the test anyway).
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// A host-network pod runs busybox, which echoes to its log; the log is read
// from the path the CRI reports, in the CRI log format.
func TestHostNetworkPodLogs(t *testing.T) {
	h := containerd.Start(t)
	ctx := testContext(t)

	sb := h.PodSandboxConfig("echo", true)
	_, ctrID := runPod(ctx, t, h, sb, h.BusyboxContainer("echo", "sh", "-c", "echo hello from busybox; echo to stderr >&2"))

	var st *runtimeapi.ContainerStatus
	require.Eventually(t, func() bool {
		resp, err := h.Runtime.ContainerStatus(ctx, ctrID, false)
		require.NoError(t, err)
		st = resp.GetStatus()
		return st.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED
	}, time.Minute, 20*time.Millisecond)
	require.Equal(t, int32(0), st.GetExitCode())
	require.Equal(t, filepath.Join(sb.GetLogDirectory(), "echo.log"), st.GetLogPath())

	b, err := os.ReadFile(st.GetLogPath())
	require.NoError(t, err)
	// CRI log lines: RFC 3339 time, stream, P(artial) or F(ull), text.
	var got []string
	for line := range strings.Lines(string(b)) {
		f := strings.SplitN(strings.TrimSuffix(line, "\n"), " ", 4)
		require.Len(t, f, 4, "CRI log line %q", line)
		_, err := time.Parse(time.RFC3339Nano, f[0])
		require.NoError(t, err)
		require.Equal(t, "F", f[2])
		got = append(got, f[1]+": "+f[3])
	}
	require.ElementsMatch(t, []string{"stdout: hello from busybox", "stderr: to stderr"}, got)
}

// A pod on the CNI bridge gets an address from the host's subnet, and the
// node reaches a server in it through the bridge.
func TestBridgePodGetsAddress(t *testing.T) {
	h := containerd.Start(t, containerd.WithCNI())
	ctx := testContext(t)

	sb := h.PodSandboxConfig("web", false)
	podID, _ := runPod(ctx, t, h, sb, h.BusyboxContainer("web", "sh", "-c", "echo served > /tmp/index.html && exec httpd -f -p 8080 -h /tmp"))

	resp, err := h.Runtime.PodSandboxStatus(ctx, podID, false)
	require.NoError(t, err)
	ip, err := netip.ParseAddr(resp.GetStatus().GetNetwork().GetIp())
	require.NoError(t, err, "pod IP %q", resp.GetStatus().GetNetwork().GetIp())
	require.True(t, h.Network.Subnet.Contains(ip), "pod IP %s outside %s", ip, h.Network.Subnet)
	require.NotEqual(t, h.Network.Gateway, ip)

	url := "http://" + netip.AddrPortFrom(ip, 8080).String() + "/index.html"
	client := &http.Client{Timeout: time.Second}
	var body string
	require.Eventually(t, func() bool { // until httpd listens
		r, err := client.Get(url)
		if err != nil {
			return false
		}
		defer r.Body.Close()
		b, err := io.ReadAll(r.Body)
		body = string(b)
		return err == nil && r.StatusCode == http.StatusOK
	}, 30*time.Second, 20*time.Millisecond)
	require.Equal(t, "served\n", body)
}

// ExecSync runs a command in a running container and returns its output
// streams and exit code.
func TestExecSync(t *testing.T) {
	h := containerd.Start(t)
	ctx := testContext(t)

	_, ctrID := runPod(ctx, t, h, h.PodSandboxConfig("exec", true), h.BusyboxContainer("exec", "sleep", "3600"))
	stdout, stderr, err := h.Runtime.ExecSync(ctx, ctrID, []string{"sh", "-c", "echo out; echo err >&2; exit 3"}, 10*time.Second)
	require.Error(t, err) // cri-client reports a non-zero exit as an error
	var exitErr interface{ ExitStatus() int }
	require.ErrorAs(t, err, &exitErr)
	require.Equal(t, 3, exitErr.ExitStatus())
	require.Equal(t, "out\n", string(stdout))
	require.Equal(t, "err\n", string(stderr))

	stdout, _, err = h.Runtime.ExecSync(ctx, ctrID, []string{"cat", "/etc/passwd"}, 10*time.Second)
	require.NoError(t, err)
	require.Contains(t, string(stdout), "root:x:0:0:")
}

// Teardown leaves no process, no mount and no network namespace behind,
// neither of the host-network pod nor of the bridge pod, and removes the
// bridge and the host's directory.
func TestTeardownLeavesNothing(t *testing.T) {
	h := containerd.Start(t, containerd.WithCNI())
	ctx := testContext(t)

	var pids []procID
	var netns string
	var cgroups []string
	for _, hostNet := range []bool{true, false} {
		name := "sleep-bridge"
		if hostNet {
			name = "sleep-host"
		}
		podID, ctrID := runPod(ctx, t, h, h.PodSandboxConfig(name, hostNet), h.BusyboxContainer(name, "sleep", "3600"))
		sb, err := h.Runtime.PodSandboxStatus(ctx, podID, true)
		require.NoError(t, err)
		info := verboseInfo(t, sb.GetInfo())
		pids = append(pids, procOf(t, info.Pid))
		if !hostNet {
			for _, ns := range info.RuntimeSpec.Linux.Namespaces {
				if ns.Type == "network" {
					netns = ns.Path
				}
			}
		}
		c, err := h.Runtime.ContainerStatus(ctx, ctrID, true)
		require.NoError(t, err)
		ctrPid := verboseInfo(t, c.GetInfo()).Pid
		pids = append(pids, procOf(t, ctrPid))
		cgroups = append(cgroups, cgroupDirs(t, ctrPid)...)
	}
	shims := processesNaming(t, h.Dir)
	require.NotEmpty(t, shims, "containerd and its shims name the host dir")
	pids = append(pids, shims...)
	require.NotEmpty(t, netns, "bridge pod's network namespace")
	for _, dir := range cgroups {
		require.DirExists(t, dir)
	}
	require.FileExists(t, netns)
	require.NotEmpty(t, mountsUnder(t, h.Dir), "rootfs, shm and netns mounts while pods run")
	_, err := os.Stat("/sys/class/net/" + h.Network.Bridge)
	require.NoError(t, err, "bridge %s exists while a pod uses it", h.Network.Bridge)

	require.NoError(t, h.Stop())

	for _, p := range pids {
		require.False(t, p.alive(), "process %d still runs", p.pid)
	}
	require.Empty(t, processesNaming(t, h.Dir))
	require.Empty(t, mountsUnder(t, h.Dir))
	require.NoFileExists(t, netns)
	require.NoDirExists(t, h.Dir)
	for _, dir := range cgroups {
		require.NoDirExists(t, dir)
	}
	_, err = os.Stat("/sys/class/net/" + h.Network.Bridge)
	require.ErrorIs(t, err, os.ErrNotExist, "bridge %s removed", h.Network.Bridge)
}

// Stop reports, and cleans up, what an orderly teardown left: here a mount
// and a process the test plants under the host's directory.
func TestStopReportsLeaks(t *testing.T) {
	h := containerd.Start(t, containerd.WithLeakGrace(200*time.Millisecond))

	src, dst := t.TempDir(), filepath.Join(h.Dir, "planted")
	require.NoError(t, os.Mkdir(dst, 0o755))
	require.NoError(t, unix.Mount(src, dst, "", unix.MS_BIND, ""))
	t.Cleanup(func() { _ = unix.Unmount(dst, unix.MNT_DETACH) }) // only if Stop failed to
	// $0 of the shell names the host dir, as a shim's -address does.
	sleeper := exec.Command("sh", "-c", "sleep 600", h.Dir)
	require.NoError(t, sleeper.Start())
	t.Cleanup(func() { _ = sleeper.Process.Kill() })

	err := h.Stop()
	require.ErrorContains(t, err, "mounts left after teardown, unmounted: "+dst)
	require.ErrorContains(t, err, "processes left after teardown, killed: "+strconv.Itoa(sleeper.Process.Pid))
	require.EqualError(t, sleeper.Wait(), "signal: killed")
	require.Empty(t, mountsUnder(t, h.Dir))
	require.NoDirExists(t, h.Dir)
	require.Equal(t, err, h.Stop(), "Stop is idempotent")
}

type verbose struct {
	Pid         int `json:"pid"`
	RuntimeSpec struct {
		Linux struct {
			Namespaces []struct {
				Type string `json:"type"`
				Path string `json:"path"`
			} `json:"namespaces"`
		} `json:"linux"`
	} `json:"runtimeSpec"`
}

func verboseInfo(t *testing.T, info map[string]string) verbose {
	t.Helper()
	var v verbose
	require.NoError(t, json.Unmarshal([]byte(info["info"]), &v))
	require.Positive(t, v.Pid)
	return v
}

// procID is a process told apart from a later one with the same pid by its
// start time.
type procID struct {
	pid   int
	start string
}

func procOf(t *testing.T, pid int) procID {
	t.Helper()
	start, ok := startOf(pid)
	require.True(t, ok, "process %d runs", pid)
	return procID{pid: pid, start: start}
}

func (p procID) alive() bool {
	start, ok := startOf(p.pid)
	return ok && start == p.start
}

func startOf(pid int) (string, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 20 || f[0] == "Z" { // a zombie has ended
		return "", false
	}
	return f[19], true
}

// cgroupDirs returns the cgroup directories of a process (v1 hierarchies
// and the unified one) below the root cgroup.
func cgroupDirs(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	require.NoError(t, err)
	var dirs []string
	for line := range strings.Lines(string(b)) {
		// hierarchy-id:controllers:path
		f := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(f) != 3 || f[2] == "/" {
			continue
		}
		name := strings.TrimPrefix(f[1], "name=")
		if name == "" {
			name = "unified"
		}
		if dir := filepath.Join("/sys/fs/cgroup", name, f[2]); isDir(dir) {
			dirs = append(dirs, dir)
		}
	}
	require.NotEmpty(t, dirs, "cgroups of process %d", pid)
	return dirs
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// processesNaming lists the processes whose command line contains s.
func processesNaming(t *testing.T, s string) []procID {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	require.NoError(t, err)
	var found []procID
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !strings.Contains(string(cmdline), s) {
			continue
		}
		if start, ok := startOf(pid); ok {
			found = append(found, procID{pid: pid, start: start})
		}
	}
	return found
}

// mountsUnder lists the lines of /proc/self/mountinfo that name dir.
func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	var found []string
	for line := range strings.Lines(string(b)) {
		if strings.Contains(line, dir) {
			found = append(found, line)
		}
	}
	return found
}

// What the runtime above the host relies on: Debian's containerd 1.6 speaks
// CRI v1 and has no CRI container events (exits must come from containerd's
// own events service, issue 8 section 3). If a newer containerd answers,
// this test says so: the relist-and-events design can then be simplified.
func TestRuntimeFacts(t *testing.T) {
	h := containerd.Start(t)
	ctx := testContext(t)

	v, err := h.Runtime.Version(ctx, "v1")
	require.NoError(t, err)
	require.Equal(t, "containerd", v.GetRuntimeName())
	require.Equal(t, "v1", v.GetRuntimeApiVersion())
	t.Logf("runtime %s %s, CRI %s", v.GetRuntimeName(), v.GetRuntimeVersion(), v.GetRuntimeApiVersion())

	events := make(chan *runtimeapi.ContainerEventResponse, 1)
	err = h.Runtime.GetContainerEvents(ctx, events, nil)
	require.Equal(t, codes.Unimplemented, status.Code(err), "containerd %s: GetContainerEvents: %v", v.GetRuntimeVersion(), err)
}

// helperEnv makes TestStaleHostIsReaped, run again as a child, the test
// binary that gets killed.
const helperEnv = "TETHER_CONTAINERD_KILLED_HOST"

// A test binary killed before its cleanup leaves its host behind (shims,
// a container, mounts); the next Start reaps it.
func TestStaleHostIsReaped(t *testing.T) {
	if os.Getenv(helperEnv) != "" {
		// The child: a host with a running pod, then wait to be killed.
		h := containerd.Start(t)
		ctx := testContext(t)
		_, ctrID := runPod(ctx, t, h, h.PodSandboxConfig("stale", true), h.BusyboxContainer("stale", "sleep", "3600"))
		c, err := h.Runtime.ContainerStatus(ctx, ctrID, true)
		require.NoError(t, err)
		fmt.Printf("host %s %d\n", h.Dir, verboseInfo(t, c.GetInfo()).Pid)
		_, _ = io.Copy(io.Discard, os.Stdin) // until killed: the parent never closes it
		t.Fatal("stdin closed: the parent died")
	}

	child := exec.Command(os.Args[0], "-test.run=^TestStaleHostIsReaped$")
	child.Env = append(os.Environ(), helperEnv+"=1")
	stdin, err := child.StdinPipe()
	require.NoError(t, err)
	defer stdin.Close()
	out, err := child.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, child.Start())
	var dir string
	var pid int
	sc := bufio.NewScanner(out)
	for dir == "" && sc.Scan() {
		_, _ = fmt.Sscanf(sc.Text(), "host %s %d", &dir, &pid)
	}
	require.NotEmpty(t, dir, "the child reports its host: %v", sc.Err())
	ctr := procOf(t, pid)
	require.NoError(t, child.Process.Kill())
	require.Error(t, child.Wait())

	// Hold the dead host's lock while looking at it, so that the Start of
	// another test binary does not reap it under our eyes.
	lock, err := os.Open(filepath.Join(dir, "owner.lock"))
	require.NoError(t, err)
	require.NoError(t, unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB), "the dead child's lock is free")
	require.NotEmpty(t, mountsUnder(t, dir), "the killed binary's mounts stay")
	require.True(t, ctr.alive(), "the killed binary's container runs on")
	require.NoError(t, lock.Close())

	containerd.Start(t)

	require.NoDirExists(t, dir)
	require.Empty(t, mountsUnder(t, dir))
	require.Empty(t, processesNaming(t, dir))
	require.False(t, ctr.alive())
}
