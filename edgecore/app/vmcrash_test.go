package app_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/json"
	"encoding/pem"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	_ "github.com/mattn/go-sqlite3" // read-only peek at the child's store
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tests/vmguest"
)

const vmChildEnv = "TETHER_VM_EDGE_CHILD"

// crashDir is what the parent and the child of TestVMSurvivesKill9 share:
// the identity and data directory, and files naming the rest.
type crashDir string

func (d crashDir) path(name string) string { return filepath.Join(string(d), name) }

func (d crashDir) read(t *testing.T, name string) string {
	b, err := os.ReadFile(d.path(name))
	require.NoError(t, err)
	return string(b)
}

// config is the EdgeCore both processes run: the cloud unreachable, the
// shim with the VM runtime, the pod manager on it.
func (d crashDir) config(t *testing.T) app.Config {
	pair, err := tls.LoadX509KeyPair(d.path("node.crt"), d.path("node.key"))
	require.NoError(t, err)
	pair.Leaf, err = x509.ParseCertificate(pair.Certificate[0])
	require.NoError(t, err)
	block, _ := pem.Decode([]byte(d.read(t, "ca.crt")))
	require.NotNil(t, block)
	ca, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	return app.Config{
		Cloud: []string{"127.0.0.1:1"}, Node: "edge-1", Certificate: pair, CA: ca,
		IdentityDir: d.path("identity"), DataDir: d.path("data"),
		CRI: app.CRIConfig{
			Listen: filepath.Join(d.read(t, "run"), "cri.sock"), Containerd: d.read(t, "containerd"),
			VM: &app.VMConfig{RunDir: d.read(t, "run"), Accel: d.read(t, "accel")},
		},
		Pods: pods.Config{LogDir: d.path("logs"), RelistPeriod: time.Hour},
		// The pool gives the VM its dedicated core.
		Resources: &resources.Config{HugepageMounts: map[int64]string{}},
		Logger:    testlog.New(),
	}
}

// TestVMEdgeChild is the EdgeCore process TestVMSurvivesKill9 kills. It
// does nothing unless started by that test.
func TestVMEdgeChild(t *testing.T) {
	dir := os.Getenv(vmChildEnv)
	if dir == "" {
		return
	}
	ctx, stop := signal.NotifyContext(klog.NewContext(context.Background(), logr.Discard()), syscall.SIGTERM)
	defer stop()
	a, err := app.New(ctx, crashDir(dir).config(t))
	require.NoError(t, err)
	_ = a.Run(ctx)
	_ = a.Close()
}

// vmRows reads the allocation rows of a store another process writes.
func vmRows(t *testing.T, dbFile string) []store.Allocation {
	db, err := sql.Open("sqlite3", "file:"+dbFile+"?mode=ro&_busy_timeout=1000")
	require.NoError(t, err)
	defer db.Close()
	rows, err := db.Query(`SELECT kind, item, owner, amount, detail FROM allocations ORDER BY kind, item`)
	if err != nil {
		return nil // not created yet
	}
	defer rows.Close()
	var out []store.Allocation
	for rows.Next() {
		var r store.Allocation
		require.NoError(t, rows.Scan(&r.Kind, &r.Item, &r.Owner, &r.Amount, &r.Detail))
		out = append(out, r)
	}
	require.NoError(t, rows.Err())
	return out
}

// guestRecord is the part of a VM record the test reads.
type guestRecord struct {
	Containers []struct {
		Pid      int    `json:"pid"`
		State    string `json:"state"`
		BootedAt int64  `json:"bootedAt"`
	} `json:"containers"`
}

// owner is the sandbox of the VM record among rows.
func (guestRecord) owner(rows []store.Allocation) string {
	for _, r := range rows {
		if r.Kind == vm.KindVM {
			return r.Owner
		}
	}
	return ""
}

// EdgeCore killed with SIGKILL while a VM with a dedicated core runs: QEMU
// keeps running (its own session), the restarted EdgeCore adopts it (same
// pid, the guest never restarted: one boot marker), the allocations are
// unchanged and the pool finds the same grant (Lookup) and gives its core
// to nobody else, the pod is Running with GuestBooted again, and deleting
// it powers the guest down and leaves nothing.
func TestVMSurvivesKill9(t *testing.T) {
	h := containerd.Start(t)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 7*time.Minute)
	defer cancel()
	d := crashDir(t.TempDir())
	ca, err := pki.NewCA("test-ca", time.Hour)
	require.NoError(t, err)
	leaf, key, err := ca.Issue(pki.LeafRequest{CommonName: "edge-1", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)
	require.NoError(t, pki.WriteFiles(d.path("node.crt"), leaf, d.path("node.key"), key))
	require.NoError(t, pki.WriteFiles(d.path("ca.crt"), ca.Cert, "", nil))
	runDir := vmguest.RunDir(t)
	for name, v := range map[string]string{"run": runDir, "containerd": h.Endpoint(), "accel": vmguest.Accel(t)} {
		require.NoError(t, os.WriteFile(d.path(name), []byte(v), 0o600))
	}
	cfg := d.config(t)
	images, err := vm.OpenImages(filepath.Join(cfg.DataDir, "vm-images"), "")
	require.NoError(t, err)
	vmguest.Import(t, images)
	require.NoError(t, os.MkdirAll(cfg.DataDir, 0o700))
	dbFile := filepath.Join(cfg.DataDir, app.DBFile)
	st, err := store.Open(ctx, dbFile, nil)
	require.NoError(t, err)
	pod := vmPod("crash")
	pod.Annotations[vm.AnnotationDedicatedCPUs] = "true"
	data, err := json.Marshal(pod)
	require.NoError(t, err)
	require.NoError(t, st.Apply(ctx, []store.Change{{Op: message.OpUpsert, Object: store.Object{
		Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)},
		Version:  "1", Data: data,
	}}}))
	require.NoError(t, st.Close())

	cmd := exec.Command(os.Args[0], "-test.run=^TestVMEdgeChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), vmChildEnv+"="+string(d))
	require.NoError(t, cmd.Start())
	killed := false
	t.Cleanup(func() {
		if !killed {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	console := filepath.Join(cfg.Pods.LogDir, "default_crash_uid-crash", "compute_0.log")
	var rows []store.Allocation
	var rec guestRecord
	require.Eventually(t, func() bool {
		rows = vmRows(t, dbFile)
		i := slices.IndexFunc(rows, func(r store.Allocation) bool { return r.Kind == vm.KindVM })
		if len(rows) != 3 || i < 0 || json.Unmarshal(rows[i].Detail, &rec) != nil || len(rec.Containers) != 1 {
			return false // the VM record, its core and the pool's grant
		}
		return rec.Containers[0].BootedAt != 0 && vmguest.CountMarker(console, vm.BootMarker) == 1
	}, 4*time.Minute, 100*time.Millisecond, "the child runs the VM and saw it boot")
	pid := rec.Containers[0].Pid
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	killed = true
	_ = cmd.Wait()
	require.NoError(t, syscall.Kill(pid, 0), "QEMU outlives EdgeCore's SIGKILL")

	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close()) }()
	stop := run(ctx, t, a)
	defer stop()
	require.Eventually(t, func() bool {
		st, ok := podStatus(ctx, a, "uid-crash")
		c := podCondition(st, pods.ConditionGuestBooted)
		return ok && st.Phase == corev1.PodRunning && c != nil && c.Status == corev1.ConditionTrue
	}, time.Minute, 100*time.Millisecond, "the adopted VM's pod is Running with GuestBooted")
	after, err := a.Store().Allocations().Kind(ctx, "")
	require.NoError(t, err)
	for i := range after {
		after[i].CreatedAt = time.Time{}
	}
	require.Equal(t, rows, after, "the allocations are unchanged")
	g, ok, err := a.Pool().Lookup(ctx, rec.owner(rows))
	require.NoError(t, err)
	require.True(t, ok)
	require.Len(t, g.CPUs, 1, "the same grant: one dedicated core")
	_, err = a.Pool().Allocate(ctx, resources.Request{Owner: "other", DedicatedCPUs: len(g.CPUs) + len(g.SharedCPUs)})
	require.ErrorIs(t, err, resources.ErrInsufficient, "the VM's core is not given twice")
	require.NoError(t, syscall.Kill(pid, 0), "the same QEMU")
	require.Equal(t, 1, vmguest.CountMarker(console, vm.BootMarker), "the guest was never restarted")
	console = openConsole(t, console) // the pod's log directory goes with the pod

	require.NoError(t, a.Store().Apply(ctx, []store.Change{{Op: message.OpDelete, Object: store.Object{
		Resource: message.Resource{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name},
	}}}))
	require.Eventually(t, func() bool {
		all, err := a.Store().Allocations().Kind(ctx, "")
		return err == nil && len(all) == 0
	}, 2*time.Minute, 100*time.Millisecond, "the VM goes with the pod")
	require.Equal(t, 1, vmguest.CountMarker(console, "TETHER-GUEST-POWERDOWN"), "powered down")
}
