package nodestatus

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/mattn/go-sqlite3" // the driver behind sql.Open("sqlite3")
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/store"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// outbox publishes into a real store; while fail > 0 each Enqueue fails
// as a full disk makes it fail.
type outbox struct {
	st   *store.Store
	fail atomic.Int32
}

func (o *outbox) Publish(ctx context.Context, it store.OutboxItem) error {
	if o.fail.Load() > 0 {
		o.fail.Add(-1)
		return errors.New("enqueue: commit: database or disk is full")
	}
	_, err := o.st.Enqueue(ctx, it)
	return err
}

func openStore(t *testing.T) (*store.Store, string) {
	path := filepath.Join(t.TempDir(), "edge.db")
	st, err := store.Open(context.Background(), path, nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, st.Close()) })
	return st, path
}

// pendingKinds returns the outbox's items by kind.
func pendingKinds(st *store.Store) map[string]store.OutboxItem {
	items, err := st.Pending(context.Background(), 100)
	if err != nil {
		return nil
	}
	out := map[string]store.OutboxItem{}
	for _, it := range items {
		out[it.Resource.Kind] = it
	}
	return out
}

func start(t *testing.T, r *Reporter) (stop func() error, done <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan struct{})
	var err error
	go func() {
		defer close(ch)
		err = r.Run(ctx)
	}()
	return func() error { cancel(); <-ch; return err }, ch
}

// TestRunSurvivesFailedEnqueue is defect 12's nodestatus half: reports
// that cannot be queued are counted and made again at the next report;
// Run keeps running (before the fix it returned the error and ended
// EdgeCore).
func TestRunSurvivesFailedEnqueue(t *testing.T) {
	st, _ := openStore(t)
	pub := &outbox{st: st}
	pub.fail.Store(6)
	reg := prometheus.NewRegistry()
	r, err := New(Config{Node: "edge-1", LeaseDuration: 40 * time.Millisecond, StatusEvery: 30 * time.Millisecond, MemoryBytes: 1 << 30, Registerer: reg}, pub, nil)
	require.NoError(t, err)
	stop, done := start(t, r)
	require.Eventually(t, func() bool {
		k := pendingKinds(st)
		return pub.fail.Load() == 0 && k["Node"].Seq != 0 && k["Lease"].Seq != 0
	}, 10*time.Second, 5*time.Millisecond, "node and lease reach the outbox once the store recovers")
	select {
	case <-done:
		t.Fatal("Run returned while the store failed")
	default:
	}
	failures := testutil.ToFloat64(r.failures.WithLabelValues("node")) + testutil.ToFloat64(r.failures.WithLabelValues("lease")) +
		testutil.ToFloat64(r.failures.WithLabelValues("status"))
	require.Equal(t, 6.0, failures)
	require.NoError(t, stop())

	var n corev1.Node
	require.NoError(t, json.Unmarshal(pendingKinds(st)["Node"].Data, &n))
	require.Equal(t, "edge-1", n.Name)
}

// TestRunSurvivesBusyStore holds the store's write lock from another
// connection, so that Enqueue fails with SQLITE_BUSY after the store's
// busy timeout: a real fault. Run keeps running, and once the lock is
// released the node registers and the lease is queued.
func TestRunSurvivesBusyStore(t *testing.T) {
	st, path := openStore(t)
	db, err := sql.Open("sqlite3", "file:"+path+"?_busy_timeout=0")
	require.NoError(t, err)
	defer db.Close()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	require.NoError(t, err)
	_, err = conn.ExecContext(ctx, "BEGIN IMMEDIATE")
	require.NoError(t, err)

	pub := &outbox{st: st}
	r, err := New(Config{Node: "edge-1", LeaseDuration: 400 * time.Millisecond, MemoryBytes: 1 << 30}, pub, nil)
	require.NoError(t, err)
	stop, done := start(t, r)
	require.Eventually(t, func() bool {
		return testutil.ToFloat64(r.failures.WithLabelValues("node")) >= 1
	}, 20*time.Second, 10*time.Millisecond, "the registration fails while the lock is held")
	select {
	case <-done:
		t.Fatal("Run returned on a busy store")
	default:
	}
	_, err = conn.ExecContext(ctx, "ROLLBACK")
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	require.Eventually(t, func() bool {
		k := pendingKinds(st)
		return k["Node"].Op == message.OpUpsert && k["Lease"].Seq != 0
	}, 20*time.Second, 10*time.Millisecond)
	require.NoError(t, stop())
}

func TestNew(t *testing.T) {
	_, err := New(Config{}, nil, nil)
	require.Error(t, err, "a node name is required")
	reg := prometheus.NewRegistry()
	_, err = New(Config{Node: "a", Registerer: reg}, nil, nil)
	require.NoError(t, err, "a nil logger is fine")
	_, err = New(Config{Node: "a", Registerer: reg}, nil, nil)
	require.Error(t, err, "a second registration is an error, not a panic")
}
