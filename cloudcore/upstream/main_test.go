package upstream

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/promtest"
)

// cp is the real etcd and kube-apiserver all tests of this package share.
var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

const (
	waitFor = 30 * time.Second // informer propagation; generous under -race
	tick    = 10 * time.Millisecond
)

// requestLog records the API requests of the writer's client.
type requestLog struct {
	mu   sync.Mutex
	reqs []string
	next http.RoundTripper
}

func (l *requestLog) RoundTrip(r *http.Request) (*http.Response, error) {
	l.mu.Lock()
	l.reqs = append(l.reqs, r.Method+" "+r.URL.Path)
	l.mu.Unlock()
	return l.next.RoundTrip(r)
}

// take returns the requests recorded since the last take.
func (l *requestLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.reqs
	l.reqs = nil
	return out
}

// logBuffer is a slog destination tests can read.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) count(substr string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), substr)
}

// fixture is a writer on the shared control plane with its requests,
// metrics and logs recorded, and an unthrottled admin client to arrange
// and check objects.
type fixture struct {
	w     *Writer
	admin kubernetes.Interface
	reqs  *requestLog
	reg   *promtest.Registry
	logs  *logBuffer
}

func adminClient(t testing.TB, cfg *rest.Config) kubernetes.Interface {
	t.Helper()
	c := rest.CopyConfig(cfg)
	c.QPS, c.Burst = 1000, 1000
	cs, err := kubernetes.NewForConfig(c)
	require.NoError(t, err)
	return cs
}

// newFixture builds a writer over binding (nil: one that binds no pod, for
// tests that write no pod status) with cfg; EdgeLabel, Logger and
// Registerer are filled in.
func newFixture(t *testing.T, binding Binding, cfg Config) *fixture {
	t.Helper()
	if binding == nil {
		binding = staleBinding{}
	}
	env := cp.Env(t)
	rc := rest.CopyConfig(env.Config)
	rc.QPS, rc.Burst = 1000, 1000
	reqs := &requestLog{}
	rc.Wrap(func(rt http.RoundTripper) http.RoundTripper { reqs.next = rt; return reqs })
	client, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)
	f := &fixture{admin: adminClient(t, env.Config), reqs: reqs, reg: promtest.NewRegistry(), logs: &logBuffer{}}
	if cfg.EdgeLabel == "" {
		cfg.EdgeLabel = catalog.DefaultEdgeLabel
	}
	cfg.Logger = slog.New(slog.NewTextHandler(f.logs, nil))
	cfg.Registerer = f.reg
	f.w, err = New(client, binding, cfg)
	require.NoError(t, err)
	return f
}

// refused returns tether_upstream_refused_total for reason. The series
// exists only once counted, so a test expecting a positive count fails
// on a renamed metric too.
func (f *fixture) refused(t *testing.T, reason string) float64 {
	t.Helper()
	return promtest.Sum(t, f.reg, "tether_upstream_refused_total", map[string]string{"reason": reason})
}

var nonName = regexp.MustCompile(`[^a-z0-9]+`)

// nodeName returns a node name unique to this run of t (the control plane
// is shared and Nodes are cluster-scoped) and deletes that Node when t
// ends.
func nodeName(t *testing.T, admin kubernetes.Interface) string {
	t.Helper()
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	base := strings.Trim(nonName.ReplaceAllString(strings.ToLower(t.Name()), "-"), "-")
	if len(base) > 40 {
		base = base[len(base)-40:]
	}
	name := strings.Trim(base, "-") + "-" + hex.EncodeToString(b)
	t.Cleanup(func() {
		_ = admin.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	return name
}

// nodeMessage is an upstream write of n (a Node named name) with op.
func nodeMessage(t *testing.T, op message.Op, name string, n *corev1.Node) *message.Message {
	t.Helper()
	data, err := json.Marshal(n)
	require.NoError(t, err)
	return &message.Message{Kind: message.KindUpstream, Op: op, Resource: message.Resource{Version: "v1", Kind: "Node", Name: name}, Payload: data}
}

// edgeNode is the Node an edge reports, as nodestatus builds it.
func edgeNode(name string, labels map[string]string) *corev1.Node {
	return &corev1.Node{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Node"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Status: corev1.NodeStatus{
			Capacity: corev1.ResourceList{corev1.ResourcePods: *resourcePods()},
			NodeInfo: corev1.NodeSystemInfo{KubeletVersion: "tether-edgecore"},
		},
	}
}

// getNode returns the Node, or nil if it does not exist.
func getNode(t *testing.T, admin kubernetes.Interface, name string) *corev1.Node {
	t.Helper()
	n, err := admin.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	require.NoError(t, err)
	return n
}

// requireRefused checks that err wraps sentinel and was counted once more
// under reason.
func requireRefused(t *testing.T, f *fixture, err, sentinel error, reason string, before float64) {
	t.Helper()
	require.Error(t, err)
	require.True(t, errors.Is(err, sentinel), "error %v does not wrap %v", err, sentinel)
	require.Equal(t, before+1, f.refused(t, reason), "refusal counted under reason %q", reason)
}

func hasTaint(taints []corev1.Taint, want corev1.Taint) bool {
	return slices.ContainsFunc(taints, func(t corev1.Taint) bool { return t.MatchTaint(&want) && t.Value == want.Value })
}
