package onboard

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/promtest"
)

// cp is the real etcd and kube-apiserver all tests of this package share.
var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

// cluster is the clients of the shared control plane.
type cluster struct {
	cfg   *rest.Config
	kube  kubernetes.Interface
	nodes *edgenode.Client
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	env := cp.Env(t)
	cfg := rest.CopyConfig(env.Config)
	cfg.QPS, cfg.Burst = 1000, 1000
	kube, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(cfg)
	require.NoError(t, err)
	return &cluster{cfg: cfg, kube: kube, nodes: edgenode.NewClient(dyn)}
}

// name returns a fresh EdgeNode name (EdgeNodes are cluster-scoped, so
// tests sharing the apiserver must not collide) and deletes that EdgeNode
// when the test ends.
func (c *cluster) name(t *testing.T, prefix string) string {
	t.Helper()
	n := prefix + "-" + strings.ToLower(rand.Text()[:8])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.nodes.Delete(ctx, n); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete EdgeNode %s: %v", n, err)
		}
	})
	return n
}

// snapshot is what a refusal must leave as it was.
type snapshot struct {
	exists          bool
	resourceVersion string
	spec            edgenode.Spec
	status          edgenode.Status
}

func (c *cluster) snapshot(t *testing.T, node string) snapshot {
	t.Helper()
	e, err := c.nodes.Get(context.Background(), node)
	if apierrors.IsNotFound(err) {
		return snapshot{}
	}
	require.NoError(t, err)
	return snapshot{exists: true, resourceVersion: e.ResourceVersion, spec: e.Spec, status: e.Status}
}

func (c *cluster) get(t *testing.T, node string) *edgenode.EdgeNode {
	t.Helper()
	e, err := c.nodes.Get(context.Background(), node)
	require.NoError(t, err)
	return e
}

func newCA(t testing.TB) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA("test-ca", 365*24*time.Hour)
	require.NoError(t, err)
	return ca
}

func ecKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return k
}

// csrPEM makes a PEM certificate request signed by key; tmpl may be nil.
func csrPEM(t testing.TB, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{Subject: pkix.Name{CommonName: "whatever"}}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// counter reads a counter from reg, summed over the series whose labels
// include want.
func counter(t *testing.T, reg *prometheus.Registry, name string, want map[string]string) float64 {
	t.Helper()
	return promtest.Sum(t, reg, name, want)
}
