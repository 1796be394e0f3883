package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/cloudcore/fleet"
	"github.com/tetheredge/tether/cloudcore/vm"
)

// TestAdminList: `cloudcore admin list`'s view of a real edge connected
// to CloudCore over QUIC: the session CloudCore recorded in the EdgeNode
// (transport, replica, since), the objects it holds (acked), its Lease's renewal, its certificate's expiry, and its Running
// pods and VMs counted by the API server (a Pending pod is not); after
// the edge stops, the session is gone and the count stays.
func TestAdminList(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	ensureRuntimeClass(t, cs)
	c := startCloud(t, env.Config, cloudOptions{timings: testTimings})
	node := uniqueNode("edge-list")
	id := c.admit(t, node)
	t.Cleanup(func() { _ = cs.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{}) })

	createPods(t, cs, ns, "run", node, 0, 3)
	vmPod := podFor(ns, "vm-0", node)
	rc := vm.RuntimeClassName
	vmPod.Spec.RuntimeClassName = &rc
	_, err := cs.CoreV1().Pods(ns).Create(ctx, vmPod, metav1.CreateOptions{})
	require.NoError(t, err)
	// The edge runs no pods here: their phase is set as its pod manager
	// would report it. run-0002 stays Pending.
	for _, name := range []string{"run-0000", "run-0001", "vm-0"} {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		p.Status.Phase = corev1.PodRunning
		_, err = cs.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		require.NoError(t, err)
	}

	e := startEdge(t, id, dataDir(t, node), c.addr, edgeOptions{timings: testTimings})
	waitRegistered(t, cs, c, node)
	host, err := os.Hostname()
	require.NoError(t, err)
	row := func() fleet.Edge {
		t.Helper()
		edges, err := fleet.List(ctx, cs, c.nodes)
		require.NoError(t, err)
		for _, e := range edges {
			if e.Name == node {
				return e
			}
		}
		t.Fatalf("admin list has no row for %s", node)
		return fleet.Edge{}
	}
	want := int64(len(desired(c.cat, node)))
	var last fleet.Edge
	if !assert.Eventually(t, func() bool {
		last = row()
		return last.Connection != nil && last.ObjectsHeld != nil && *last.ObjectsHeld == want && last.LastSeen != nil
	}, 60*time.Second, 50*time.Millisecond) {
		js, _ := json.Marshal(last)
		t.Fatalf("the EdgeNode records the session and the reconcile's %d objects, and the Lease is renewed: %s", want, js)
	}
	r := row()
	require.True(t, r.Allowed)
	require.Equal(t, "quic", r.Connection.Transport)
	require.Equal(t, host, r.Connection.Replica)
	require.WithinDuration(t, time.Now(), r.Connection.Since.Time, time.Minute)
	require.Equal(t, id.cert.Leaf.SerialNumber.Text(16), r.CertSerial)
	require.WithinDuration(t, id.cert.Leaf.NotAfter, *r.CertExpires, time.Second)
	require.Equal(t, 2, r.Pods, "run-0000 and run-0001 run; run-0002 is Pending")
	require.Equal(t, 1, r.VMs)
	require.GreaterOrEqual(t, want, int64(5), "the Node and four pods at least")

	var out bytes.Buffer
	require.NoError(t, fleet.Write(&out, []fleet.Edge{r}, fleet.FormatTable, time.Now()))
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 2)
	require.Equal(t, []string{"NAME", "ALLOWED", "CONNECTED", "SINCE", "LAST-SEEN", "CERT-EXPIRES", "OBJECTS", "PODS", "VMS"}, strings.Fields(lines[0]))
	fields := strings.Fields(lines[1])
	require.Equal(t, []string{node, "true", "quic@" + host}, fields[:3])
	require.Equal(t, []string{id.cert.Leaf.NotAfter.UTC().Format(time.RFC3339), strconv.FormatInt(want, 10), "2", "1"}, fields[5:])
	out.Reset()
	require.NoError(t, fleet.Write(&out, []fleet.Edge{r}, fleet.FormatJSON, time.Now()))
	var decoded []fleet.Edge
	require.NoError(t, json.Unmarshal(out.Bytes(), &decoded))
	require.Equal(t, r.Connection.Session, decoded[0].Connection.Session)
	writes := c.counter(t, "tether_edgenode_status_writes_total", map[string]string{"result": "ok"})
	require.LessOrEqual(t, writes, 3.0, "the session's start, the count after the reconcile and the count once the pods arrived: at most three writes")

	e.stop()
	require.Eventually(t, func() bool { return row().Connection == nil }, 60*time.Second, 50*time.Millisecond,
		"the end of the session clears it")
	r = row()
	require.Equal(t, want, *r.ObjectsHeld, "what the edge holds stays known while it is offline")
	out.Reset()
	require.NoError(t, fleet.Write(&out, []fleet.Edge{r}, fleet.FormatWide, time.Now()))
	require.Equal(t, []string{node, "true", "no", "-"}, strings.Fields(strings.Split(out.String(), "\n")[1])[:4])
}
