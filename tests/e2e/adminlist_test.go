package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"slices"
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
	edgeapp "github.com/tetheredge/tether/edgecore/app"
)

// TestAdminList: `cloudcore admin list`'s view of a real edge connected
// to CloudCore over QUIC: the session CloudCore recorded in the EdgeNode
// (transport, replica, the edge's address, since), the objects it holds
// (acked), its Lease's renewal, its certificate's expiry, and its Running
// pods and VMs counted by the API server (a Pending pod is not); after
// the edge stops, the session is gone and the count stays. The address
// is the edge's own socket's, as the kernel shows it: the loopback
// address and the port of the edge's UDP socket (closed when the edge
// stops), and for a second edge over WebSocket exactly the local address
// of its TCP connection to CloudCore.
func TestAdminList(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	ensureRuntimeClass(t, cs)
	c := startCloud(t, env.Config, cloudOptions{timings: testTimings, webSocket: true})
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
	rowOf := func(name string) fleet.Edge {
		t.Helper()
		edges, err := fleet.List(ctx, cs, c.nodes)
		require.NoError(t, err)
		for _, e := range edges {
			if e.Name == name {
				return e
			}
		}
		t.Fatalf("admin list has no row for %s", name)
		return fleet.Edge{}
	}
	row := func() fleet.Edge { t.Helper(); return rowOf(node) }
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

	// The edge dialled 127.0.0.1 from a UDP socket of its own bound to the
	// wildcard address: CloudCore saw the loopback address and that
	// socket's port. The port is no other socket's (a bound UDP port is
	// unique), and the socket closes with the edge below.
	remote, err := netip.ParseAddrPort(r.Connection.RemoteAddr)
	require.NoError(t, err, "status.connection.remoteAddr")
	require.Equal(t, netip.MustParseAddr("127.0.0.1"), remote.Addr())
	require.NotEqual(t, netip.MustParseAddrPort(c.addr).Port(), remote.Port(), "the edge's port, not CloudCore's")
	edgeSocket := func() bool {
		return slices.ContainsFunc(ownSockets(t, "udp"), func(s socket) bool {
			return s.local.Port() == remote.Port() && (s.local.Addr().IsUnspecified() || s.local.Addr() == remote.Addr())
		})
	}
	require.True(t, edgeSocket(), "a UDP socket of this process is bound to port %d, the edge's", remote.Port())

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
	require.Equal(t, r.Connection.RemoteAddr, decoded[0].Connection.RemoteAddr)
	out.Reset()
	require.NoError(t, fleet.Write(&out, []fleet.Edge{r}, fleet.FormatWide, time.Now()))
	lines = strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Equal(t, []string{"REPLICA", "ADDRESS", "SESSION"}, strings.Fields(lines[0])[9:12])
	require.Equal(t, []string{"quic", host, remote.String(), r.Connection.Session}, slices.Delete(strings.Fields(lines[1])[2:12], 1, 7))
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
	require.Eventually(t, func() bool { return !edgeSocket() }, 60*time.Second, 50*time.Millisecond,
		"the UDP socket on port %d was the edge's: it closes with it", remote.Port())

	// Over WebSocket, the address is the edge's end of its TCP connection
	// to CloudCore's WebSocket listener.
	wsNode := uniqueNode("edge-list-ws")
	wsID := c.admit(t, wsNode)
	t.Cleanup(func() { _ = cs.CoreV1().Nodes().Delete(context.Background(), wsNode, metav1.DeleteOptions{}) })
	wsListen := netip.MustParseAddrPort(c.app.WebSocketAddr().String())
	startEdge(t, wsID, dataDir(t, wsNode), c.addr, edgeOptions{timings: testTimings, configure: func(cfg *edgeapp.Config) {
		cfg.Cloud = []string{"wss://" + wsListen.String()}
	}})
	require.Eventually(t, func() bool { return rowOf(wsNode).Connection != nil }, 60*time.Second, 50*time.Millisecond,
		"the EdgeNode records the WebSocket session")
	wc := rowOf(wsNode).Connection
	require.Equal(t, "websocket", wc.Transport)
	wsRemote, err := netip.ParseAddrPort(wc.RemoteAddr)
	require.NoError(t, err, "status.connection.remoteAddr")
	const established = "01"
	var toCloud []socket
	for _, s := range ownSockets(t, "tcp") {
		if s.remote == wsListen && s.state == established {
			toCloud = append(toCloud, s)
		}
	}
	require.True(t, slices.ContainsFunc(toCloud, func(s socket) bool { return s.local == wsRemote }),
		"the recorded %s is the local address of one of the edge's connections to %s: %v", wsRemote, wsListen, toCloud)
}
