package e2e

import (
	"context"
	"crypto/tls"
	"database/sql"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	_ "github.com/mattn/go-sqlite3" // read-only peek at the child's database
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/edgehub"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tunnel"
)

const childEnv = "TETHER_E2E_EDGE_CHILD"

// TestEdgeChild is the EdgeCore process that TestEdgeKill9 kills. It does
// nothing unless started by that test.
func TestEdgeChild(t *testing.T) {
	dir := os.Getenv(childEnv)
	if dir == "" {
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key"))
	require.NoError(t, err)
	pool, err := pki.LoadPool(filepath.Join(dir, "ca.crt"))
	require.NoError(t, err)
	addr, err := os.ReadFile(filepath.Join(dir, "addr"))
	require.NoError(t, err)
	st, err := store.Open(ctx, filepath.Join(dir, "edge.db"), logger())
	require.NoError(t, err)
	client, err := tunnel.NewClient(tunnel.ClientConfig{
		Servers: []string{"quic://" + string(addr)}, Node: "edge-k", Options: tunnel.Options{Logger: logger()},
		TLS: &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: pool, MinVersion: tls.VersionTLS13},
	})
	require.NoError(t, err)
	sy, err := syncer.New(st, syncer.Config{MaxBatch: 64}, logger(), nil)
	require.NoError(t, err)
	_ = edgehub.New(client, sy, logger()).Run(ctx)
}

// TestEdgeKill9 kills an EdgeCore process with SIGKILL while it applies the
// cloud's batches, then starts it again on the same database: the store is
// intact and the edge converges to the cloud's state.
func TestEdgeKill9(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	p := newPKI(t)
	createEdgeNode(t, cs, "edge-k")
	const pods = 1500
	createPods(t, cs, ns, "k", "edge-k", 0, pods)
	addr := freeUDP(t)
	c := startCloud(t, env.Config, p, addr, testTimings)

	dir := t.TempDir()
	cert, key, err := p.ca.Issue(pki.LeafRequest{CommonName: "edge-k", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)
	require.NoError(t, pki.WriteFiles(filepath.Join(dir, "node.crt"), cert, filepath.Join(dir, "node.key"), key))
	require.NoError(t, pki.WriteFiles(filepath.Join(dir, "ca.crt"), p.ca.Cert, "", nil))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "addr"), []byte(addr), 0o600))
	dbFile := filepath.Join(dir, "edge.db")

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

	// Kill it while the sync is under way: some objects committed, not all.
	seen := 0
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		seen = countObjects(dbFile)
		if seen > 0 && seen < pods/2 {
			break
		}
		if seen >= pods/2 {
			t.Fatalf("the edge applied %d objects before the test could kill it mid-sync", seen)
		}
		time.Sleep(time.Millisecond)
	}
	require.Positive(t, seen, "the edge never started applying")
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	killed = true
	_ = cmd.Wait()
	t.Logf("killed the edge with %d of %d+ objects committed", seen, pods)

	// The same database, a new EdgeCore: intact and converging.
	e := startEdge(t, "edge-k", dbFile, addr, p, testTimings, nil)
	var integrity string
	db, err := sql.Open("sqlite3", "file:"+dbFile+"?mode=ro")
	require.NoError(t, err)
	require.NoError(t, db.QueryRow("PRAGMA integrity_check").Scan(&integrity))
	require.NoError(t, db.Close())
	require.Equal(t, "ok", integrity)
	waitConverged(t, c.cat, e.st, "edge-k", pods+1)
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
