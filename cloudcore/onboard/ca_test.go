package onboard

import (
	"context"
	"crypto/rand"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/tests/testlog"
)

func TestEnsureCACreatesOnceAndReloads(t *testing.T) {
	c := newCluster(t)
	ns := cp.Env(t).Namespace(t)
	ctx := t.Context()

	ca, err := EnsureCA(ctx, c.kube, ns, "ca", testlog.New())
	require.NoError(t, err)
	require.True(t, ca.Cert.IsCA)
	require.WithinDuration(t, time.Now().Add(CAValidity), ca.Cert.NotAfter, time.Hour)

	s, err := c.kube.CoreV1().Secrets(ns).Get(ctx, "ca", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, corev1.SecretTypeTLS, s.Type)
	require.Equal(t, pki.EncodeCert(ca.Cert), s.Data[corev1.TLSCertKey])

	again, err := EnsureCA(ctx, c.kube, ns, "ca", testlog.New())
	require.NoError(t, err)
	require.Equal(t, ca.Cert.Raw, again.Cert.Raw)
	// The loaded key is the one that signed: it issues verifiable certs.
	leaf, _, err := again.Issue(pki.LeafRequest{CommonName: "n", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)
	require.NoError(t, leaf.CheckSignatureFrom(ca.Cert))

	s2, err := c.kube.CoreV1().Secrets(ns).Get(ctx, "ca", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, s.ResourceVersion, s2.ResourceVersion, "loading must not write")
}

// Replicas starting together against a cluster with neither the namespace
// nor the Secret all end up with the one CA that won the race.
func TestEnsureCAConcurrentReplicasAgree(t *testing.T) {
	c := newCluster(t)
	ns := "tether-race-" + strings.ToLower(rand.Text()[:8])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = c.kube.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
	})

	const replicas = 4
	cas := make([]*pki.CA, replicas)
	errs := make([]error, replicas)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range replicas {
		wg.Go(func() {
			<-start
			cas[i], errs[i] = EnsureCA(context.Background(), c.kube, ns, DefaultCAName, testlog.New())
		})
	}
	close(start)
	wg.Wait()
	for i := range replicas {
		require.NoError(t, errs[i], "replica %d", i)
		require.Equal(t, cas[0].Cert.Raw, cas[i].Cert.Raw, "replica %d has another CA", i)
	}
	s, err := c.kube.CoreV1().Secrets(ns).Get(t.Context(), DefaultCAName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, pki.EncodeCert(cas[0].Cert), s.Data[corev1.TLSCertKey])
}

func TestEnsureCADefaults(t *testing.T) {
	c := newCluster(t)
	ctx := t.Context()
	ca, err := EnsureCA(ctx, c.kube, "", "", nil)
	require.NoError(t, err)
	s, err := c.kube.CoreV1().Secrets(DefaultCANamespace).Get(ctx, DefaultCAName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, pki.EncodeCert(ca.Cert), s.Data[corev1.TLSCertKey])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := c.kube.CoreV1().Secrets(DefaultCANamespace).Delete(ctx, DefaultCAName, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete CA secret: %v", err)
		}
	})
}

// A Secret that does not hold a usable CA is an error, and is left for the
// operator: overwriting it would silently invalidate every node.
func TestEnsureCARefusesBadSecretAndLeavesIt(t *testing.T) {
	c := newCluster(t)
	ns := cp.Env(t).Namespace(t)

	other := newCA(t)
	otherKey, err := pki.EncodeKey(other.Key)
	require.NoError(t, err)
	ca := newCA(t)
	caKey, err := pki.EncodeKey(ca.Key)
	require.NoError(t, err)
	leaf, leafKey, err := ca.Issue(pki.LeafRequest{CommonName: "leaf", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)
	leafKeyPEM, err := pki.EncodeKey(leafKey)
	require.NoError(t, err)
	expired, err := pki.NewCA("expired", time.Nanosecond)
	require.NoError(t, err)
	expiredKey, err := pki.EncodeKey(expired.Key)
	require.NoError(t, err)

	for _, tc := range []struct {
		name      string
		cert, key []byte
		want      string
	}{
		{"garbage", []byte("not a certificate"), []byte("not a key"), "load key pair"},
		{"key of another CA", pki.EncodeCert(ca.Cert), otherKey, "load key pair"},
		{"not a CA", pki.EncodeCert(leaf), leafKeyPEM, "not a CA"},
		{"two certificates", append(pki.EncodeCert(ca.Cert), pki.EncodeCert(other.Cert)...), caKey, "exactly one"},
		{"expired", pki.EncodeCert(expired.Cert), expiredKey, "the CA expired"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := "ca-" + strings.ToLower(rand.Text()[:6])
			created, err := c.kube.CoreV1().Secrets(ns).Create(t.Context(), &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: name},
				Type:       corev1.SecretTypeTLS,
				Data:       map[string][]byte{corev1.TLSCertKey: tc.cert, corev1.TLSPrivateKeyKey: tc.key},
			}, metav1.CreateOptions{})
			require.NoError(t, err)

			_, err = EnsureCA(t.Context(), c.kube, ns, name, testlog.New())
			require.ErrorContains(t, err, "does not hold a usable cluster CA")
			require.ErrorContains(t, err, ns+"/"+name)
			require.ErrorContains(t, err, tc.want)

			after, err := c.kube.CoreV1().Secrets(ns).Get(t.Context(), name, metav1.GetOptions{})
			require.NoError(t, err)
			require.Equal(t, created.ResourceVersion, after.ResourceVersion)
			require.Equal(t, created.Data, after.Data)
		})
	}
}

func TestServerCertificateChainsToCA(t *testing.T) {
	ca := newCA(t)
	cert, err := ServerCertificate(ca, []string{"127.0.0.1", "cloud.example"}, time.Hour)
	require.NoError(t, err)
	require.Equal(t, []string{"cloud.example"}, cert.Leaf.DNSNames)
	require.NoError(t, cert.Leaf.VerifyHostname("127.0.0.1"))
	require.NoError(t, cert.Leaf.CheckSignatureFrom(ca.Cert))
	_, err = ServerCertificate(ca, nil, time.Hour)
	require.Error(t, err)
}
