package hollow

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"time"

	"golang.org/x/sync/errgroup"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/common/pki"
)

// Identity is one hollow edge's name and client certificate (Leaf set).
type Identity struct {
	Node string
	Cert tls.Certificate
}

// OnboardConfig says where the cluster CA is and how fast to write.
type OnboardConfig struct {
	// CANamespace and CAName name the cluster CA Secret. Defaults
	// onboard.DefaultCANamespace and onboard.DefaultCAName.
	CANamespace, CAName string
	// Validity of the node certificates. Default 24h.
	Validity time.Duration
	// Parallel is how many EdgeNodes are written at once. Default 32.
	Parallel int
	// Logger defaults to a discard logger.
	Logger *slog.Logger
}

// Onboard whitelists nodes the fast way a test may take: it reads (or
// creates) the cluster CA from its Secret with onboard.EnsureCA, issues
// each node a client certificate from it, and writes the allowed EdgeNode
// with that certificate as current, which is what `cloudcore admin allow`
// followed by `edgecore join` leave behind. An EdgeNode left by an earlier
// run is updated. It returns the identities, in the order of nodes, and
// the CA certificate the edges verify the cloud with.
func Onboard(ctx context.Context, cfg *rest.Config, nodes []string, o OnboardConfig) ([]Identity, *x509.Certificate, error) {
	if o.CANamespace == "" {
		o.CANamespace = onboard.DefaultCANamespace
	}
	if o.CAName == "" {
		o.CAName = onboard.DefaultCAName
	}
	if o.Validity <= 0 {
		o.Validity = 24 * time.Hour
	}
	if o.Parallel <= 0 {
		o.Parallel = 32
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	fast := rest.CopyConfig(cfg)
	fast.QPS, fast.Burst = 2000, 4000
	cs, err := kubernetes.NewForConfig(fast)
	if err != nil {
		return nil, nil, fmt.Errorf("build clientset: %w", err)
	}
	dyn, err := dynamic.NewForConfig(fast)
	if err != nil {
		return nil, nil, fmt.Errorf("build dynamic client: %w", err)
	}
	ca, err := onboard.EnsureCA(ctx, cs, o.CANamespace, o.CAName, o.Logger)
	if err != nil {
		return nil, nil, fmt.Errorf("read the cluster CA: %w", err)
	}
	client := edgenode.NewClient(dyn)
	ids := make([]Identity, len(nodes))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(o.Parallel)
	for i, node := range nodes {
		g.Go(func() error {
			id, err := admit(gctx, client, ca, node, o.Validity)
			ids[i] = id
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}
	return ids, ca.Cert, nil
}

// admit issues node's certificate and records it on an allowed EdgeNode.
func admit(ctx context.Context, client *edgenode.Client, ca *pki.CA, node string, validity time.Duration) (Identity, error) {
	cert, key, err := ca.Issue(pki.LeafRequest{CommonName: node, Usage: pki.UsageClient, Validity: validity})
	if err != nil {
		return Identity{}, fmt.Errorf("issue certificate of %s: %w", node, err)
	}
	en, err := client.Create(ctx, &edgenode.EdgeNode{ObjectMeta: metav1.ObjectMeta{Name: node}, Spec: edgenode.Spec{Allowed: true}})
	if apierrors.IsAlreadyExists(err) {
		if en, err = client.Get(ctx, node); err == nil {
			en.Spec = edgenode.Spec{Allowed: true}
			en, err = client.Update(ctx, en)
		}
	}
	if err != nil {
		return Identity{}, fmt.Errorf("write EdgeNode %s: %w", node, err)
	}
	// As the join records it (cloudcore/onboard certRecord).
	en.Status.Certificate = &edgenode.Certificate{Serial: cert.SerialNumber.Text(16), NotAfter: metav1.NewTime(cert.NotAfter)}
	en.Status.Previous = nil
	if _, err := client.UpdateStatus(ctx, en); err != nil {
		return Identity{}, fmt.Errorf("record the certificate of EdgeNode %s: %w", node, err)
	}
	return Identity{Node: node, Cert: tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}, nil
}
