package onboard

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/common/join"
	"github.com/tetheredge/tether/common/pki"
)

// Where the cluster CA lives by default, and how long a new one is valid.
const (
	DefaultCANamespace = "tether-system"
	DefaultCAName      = "tether-ca"
	CAValidity         = 10 * 365 * 24 * time.Hour
	caCommonName       = "tether-cluster-ca"
)

// EnsureCA returns the cluster CA kept in the Secret namespace/name (empty
// strings mean DefaultCANamespace and DefaultCAName), creating the namespace
// and a new CA when there is none. When several CloudCores start at once,
// the first to create the Secret wins and the others load its CA: an
// existing Secret is never overwritten, and one that does not hold a valid
// CA is an error for the operator to resolve.
func EnsureCA(ctx context.Context, client kubernetes.Interface, namespace, name string, logger *slog.Logger) (*pki.CA, error) {
	if namespace == "" {
		namespace = DefaultCANamespace
	}
	if name == "" {
		name = DefaultCAName
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	secrets := client.CoreV1().Secrets(namespace)
	s, err := secrets.Get(ctx, name, metav1.GetOptions{})
	switch {
	case err == nil:
		return loadCA(s, namespace, name, logger)
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("read CA secret %s/%s: %w", namespace, name, err)
	}

	if err := ensureNamespace(ctx, client, namespace); err != nil {
		return nil, err
	}
	ca, err := pki.NewCA(caCommonName, CAValidity)
	if err != nil {
		return nil, err
	}
	keyPEM, err := pki.EncodeKey(ca.Key)
	if err != nil {
		return nil, err
	}
	s = &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{
			Name:      name,
			Namespace: namespace,
			Labels:    map[string]string{"app.kubernetes.io/part-of": "tether"},
		},
		Type: corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       pki.EncodeCert(ca.Cert),
			corev1.TLSPrivateKeyKey: keyPEM,
		},
	}
	_, err = secrets.Create(ctx, s, metav1.CreateOptions{})
	switch {
	case err == nil:
		logger.Info("cluster CA created", "namespace", namespace, "name", name,
			"ca_hash", caHashOf(ca), "not_after", ca.Cert.NotAfter)
		return ca, nil
	case !apierrors.IsAlreadyExists(err):
		return nil, fmt.Errorf("create CA secret %s/%s: %w", namespace, name, err)
	}
	// Another CloudCore created it between our Get and Create: use theirs.
	s, err = secrets.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("read CA secret %s/%s created concurrently: %w", namespace, name, err)
	}
	return loadCA(s, namespace, name, logger)
}

func ensureNamespace(ctx context.Context, client kubernetes.Interface, namespace string) error {
	_, err := client.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{})
	if err == nil {
		return nil
	}
	if !apierrors.IsNotFound(err) {
		return fmt.Errorf("read namespace %s: %w", namespace, err)
	}
	_, err = client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", namespace, err)
	}
	return nil
}

func loadCA(s *corev1.Secret, namespace, name string, logger *slog.Logger) (*pki.CA, error) {
	ca, err := decodeCA(s.Data[corev1.TLSCertKey], s.Data[corev1.TLSPrivateKeyKey], time.Now())
	if err != nil {
		return nil, fmt.Errorf("CA secret %s/%s does not hold a usable cluster CA (it is left as it is; "+
			"repair it, or delete it to have a new CA made, which invalidates every node certificate): %w", namespace, name, err)
	}
	logger.Debug("cluster CA loaded", "namespace", namespace, "name", name,
		"ca_hash", caHashOf(ca), "not_after", ca.Cert.NotAfter)
	return ca, nil
}

// decodeCA checks PEM certificate and key: one key pair, the certificate a
// CA able to sign certificates, valid at now.
func decodeCA(certPEM, keyPEM []byte, now time.Time) (*pki.CA, error) {
	if len(certPEM) == 0 || len(keyPEM) == 0 {
		return nil, fmt.Errorf("want non-empty %s and %s", corev1.TLSCertKey, corev1.TLSPrivateKeyKey)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load key pair: %w", err)
	}
	if len(pair.Certificate) != 1 {
		return nil, fmt.Errorf("%s holds %d certificates; want exactly one", corev1.TLSCertKey, len(pair.Certificate))
	}
	cert := pair.Leaf
	if cert == nil {
		if cert, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("the private key cannot sign")
	}
	switch {
	case !cert.BasicConstraintsValid || !cert.IsCA:
		return nil, errors.New("the certificate is not a CA")
	case cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0:
		return nil, errors.New("the CA certificate may not sign certificates (no certSign key usage)")
	case now.After(cert.NotAfter):
		return nil, fmt.Errorf("the CA expired at %s", cert.NotAfter.UTC().Format(time.RFC3339))
	}
	return &pki.CA{Cert: cert, Key: signer}, nil
}

func caHashOf(ca *pki.CA) string { return "sha256:" + join.CAHash(ca.Cert) }

// ServerCertificate issues CloudCore's TLS server certificate from the
// cluster CA for the given host names and addresses, to serve the join
// endpoint (and the tunnel) without certificate files: joining nodes check
// it against the CA the token names.
func ServerCertificate(ca *pki.CA, hosts []string, validity time.Duration) (tls.Certificate, error) {
	if len(hosts) == 0 {
		return tls.Certificate{}, errors.New("server certificate: no host names")
	}
	cert, key, err := ca.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: hosts, Validity: validity})
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{cert.Raw, ca.Cert.Raw}, PrivateKey: key, Leaf: cert}, nil
}
