package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	_ "github.com/mattn/go-sqlite3" // read-only peek at the child's database
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/common/pki"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/testlog"
)

const childEnv = "TETHER_E2E_EDGE_CHILD"

// TestEdgeChild is the EdgeCore process that TestEdgeKill9 kills and
// BenchmarkEdgeRSS measures: the shipped wiring (edgecore/app) on the
// identity and data directory the test prepared (writeChildFiles). With a
// containerd endpoint in the directory it runs the CRI shim in-process
// and its pods; SIGUSR1 then writes a heap profile to heap.pprof. It does
// nothing unless started by such a test.
func TestEdgeChild(t *testing.T) {
	dir := os.Getenv(childEnv)
	if dir == "" {
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key"))
	require.NoError(t, err)
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	require.NoError(t, err)
	block, _ := pem.Decode(caPEM)
	require.NotNil(t, block)
	ca, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		require.NoError(t, err)
		return string(b)
	}
	cfg := edgeapp.Config{
		Cloud: []string{"quic://" + read("addr")}, Node: read("node"), Certificate: pair, CA: ca,
		IdentityDir: dir, DataDir: dir, Syncer: syncer.Config{MaxBatch: 64},
		NodeStatus: nodestatus.Config{Now: func() time.Time { return stableEpoch }, MemoryBytes: 4 << 30},
		Logger:     testlog.New(),
	}
	if _, err := os.Stat(filepath.Join(dir, "containerd")); err == nil {
		cfg.CRI = edgeapp.CRIConfig{Listen: read("cri-listen"), Containerd: read("containerd")}
		cfg.Pods = pods.Config{HostIPs: []string{"127.0.0.1"}, LogDir: filepath.Join(dir, "logs")}
		cfg.NodeStatus.RequireRuntime = true
		profiled := heapProfileOnSignal(t, filepath.Join(dir, "heap.pprof"))
		defer profiled()
	}
	a, err := edgeapp.New(klog.NewContext(ctx, logr.Discard()), cfg)
	require.NoError(t, err)
	_ = a.Run(ctx)
	_ = a.Close()
}

// heapProfileOnSignal writes a heap profile to path on every SIGUSR1 until
// the returned stop is called.
func heapProfileOnSignal(t *testing.T, path string) (stop func()) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-quit:
				return
			case <-sig:
				runtime.GC()
				f, err := os.Create(path + ".tmp")
				if err == nil {
					err = errors.Join(pprof.Lookup("heap").WriteTo(f, 0), f.Close(), os.Rename(path+".tmp", path))
				}
				if err != nil {
					t.Errorf("write heap profile: %v", err)
				}
			}
		}
	}()
	return func() { signal.Stop(sig); close(quit); <-done }
}

// writeChildFiles writes what TestEdgeChild reads into dir: the node's
// certificate, key and CA, the cloud's address and the node's name.
func writeChildFiles(tb testing.TB, dir string, id identity, cloudAddr string) {
	tb.Helper()
	require.NoError(tb, pki.WriteFiles(filepath.Join(dir, "node.crt"), id.cert.Leaf, filepath.Join(dir, "node.key"), id.key))
	require.NoError(tb, pki.WriteFiles(filepath.Join(dir, "ca.crt"), id.ca, "", nil))
	require.NoError(tb, os.WriteFile(filepath.Join(dir, "addr"), []byte(cloudAddr), 0o600))
	require.NoError(tb, os.WriteFile(filepath.Join(dir, "node"), []byte(id.node), 0o600))
}

// TestEdgeKill9 kills an EdgeCore process with SIGKILL while it applies the
// cloud's batches, then starts it again on the same data directory: the
// store is intact, every object committed before the kill is still there,
// and the cloud sends exactly the objects the store lacks, no committed
// one again.
func TestEdgeKill9(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	node := uniqueNode("edge-k")
	createEdgeNode(t, cs, node)
	const pods = 1500
	createPods(t, cs, ns, "k", node, 0, pods)
	c := startCloud(t, env.Config, cloudOptions{timings: testTimings})
	id := c.admit(t, node)

	dir := dataDir(t, node)
	writeChildFiles(t, dir, id, c.addr)
	dbFile := storePath(dir)

	cmd := exec.Command(os.Args[0], "-test.run=^TestEdgeChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+dir)
	require.NoError(t, cmd.Start())
	killed := false
	t.Cleanup(func() {
		if !killed {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})

	// Kill it while the sync is under way: at least one batch of objects
	// committed, not half, and its Node registered (so that no write of
	// the killed process is left to change, during the restart, what the
	// cloud must send).
	registered := func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		return err == nil && slices.ContainsFunc(n.Status.Conditions, func(c corev1.NodeCondition) bool { return c.Reason == "EdgeCoreReady" })
	}
	seen := 0
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		seen = countObjects(dbFile)
		if seen > 64 && seen < pods/2 && registered() {
			break
		}
		if seen >= pods/2 {
			t.Fatalf("the edge applied %d objects before the test could kill it mid-sync", seen)
		}
		time.Sleep(time.Millisecond) // polling another process's file: there is nothing to wait on
	}
	require.Greater(t, seen, 64, "the edge never applied a batch")
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	killed = true
	_ = cmd.Wait()

	// What the killed process committed, read before anything opens the
	// store again.
	db, err := sql.Open("sqlite3", "file:"+dbFile+"?mode=ro")
	require.NoError(t, err)
	var integrity string
	require.NoError(t, db.QueryRow("PRAGMA integrity_check").Scan(&integrity))
	require.NoError(t, db.Close())
	require.Equal(t, "ok", integrity)
	committed := storeContents(t, dir)
	t.Logf("killed the edge with %d of %d objects committed", len(committed), pods+1)
	require.Less(t, len(committed), pods+1, "the kill came before the sync was complete")

	// The cloud notices the dead session before the counters are read, so
	// that what it sends the dead process does not count.
	require.Eventually(t, func() bool { return !slices.Contains(c.app.Connected(), node) }, 30*time.Second, 20*time.Millisecond)
	objects0 := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"})
	dones0 := c.dones(t)

	e := startEdge(t, id, dir, c.addr, edgeOptions{timings: testTimings})
	c.waitDones(t, dones0+1)
	waitConverged(t, c.cat, e.st, node, pods+1)
	// An object committed before the kill at the version the cloud still
	// has must be there and must not cross again; the rest (missing, or
	// changed in the API since, like the Node its registration wrote)
	// crosses once.
	want, after := desired(c.cat, node), held(t, e.st)
	survived, resend := 0, 0
	for k, v := range want {
		if committed[k] == v {
			survived++
		} else {
			resend++
		}
	}
	require.Positive(t, survived, "objects committed before the kill are still current")
	for k, v := range committed {
		if want[k] == v && after[k] != v {
			t.Errorf("object %x committed at version %x before the kill is at %x after the restart", k, v, after[k])
		}
	}
	require.Eventually(t, func() bool {
		v, err := promtest.Value(e.reg, "tether_edge_events_applied_total", nil)
		return err == nil && v >= float64(resend)
	}, 30*time.Second, 10*time.Millisecond)
	objects := c.counter(t, "tether_sync_messages_sent_total", map[string]string{"kind": "object"}) - objects0
	t.Logf("after the restart: %d committed objects survived, %d had to cross; the cloud sent %v, the edge applied %v",
		survived, resend, objects, e.applied(t))
	require.Equal(t, float64(resend), objects, "the cloud sends exactly the objects the store lacks")
	require.Equal(t, float64(resend), e.applied(t), "the edge applies only what it lacked")
}

// countObjects peeks at a store another process writes (WAL allows it).
func countObjects(path string) int {
	db, err := sql.Open("sqlite3", "file:"+path+"?mode=ro&_busy_timeout=100")
	if err != nil {
		return 0
	}
	defer db.Close()
	var n int
	if err := db.QueryRow("SELECT count(*) FROM objects").Scan(&n); err != nil {
		return 0
	}
	return n
}
