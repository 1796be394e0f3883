package onboard

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/pki"
)

var (
	oidExtKeyUsage       = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidBasicConstraints  = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidServerAuth        = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	oidSubjectAltName    = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidKeyUsageExtension = asn1.ObjectIdentifier{2, 5, 29, 15}
)

// requireClientCert checks what every node certificate must be, whatever
// the request asked.
func requireClientCert(t *testing.T, ca *pki.CA, cert *x509.Certificate, node string) {
	t.Helper()
	require.Equal(t, pkix.Name{CommonName: node}.String(), cert.Subject.String())
	require.Equal(t, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, cert.ExtKeyUsage)
	require.Empty(t, cert.UnknownExtKeyUsage)
	require.Equal(t, x509.KeyUsageDigitalSignature, cert.KeyUsage)
	require.False(t, cert.IsCA)
	require.Empty(t, cert.DNSNames)
	require.Empty(t, cert.IPAddresses)
	require.Empty(t, cert.URIs)
	require.Empty(t, cert.EmailAddresses)
	require.GreaterOrEqual(t, cert.SerialNumber.BitLen(), 64, "serial must be random")
	_, err := cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	require.NoError(t, err)
	_, err = cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	require.Error(t, err, "a node certificate must not serve TLS")
}

func TestSignSubjectIsTheNodeNotTheRequest(t *testing.T) {
	ca := newCA(t)
	iss := &Issuer{CA: ca}
	key := ecKey(t)
	req := csrPEM(t, key, &x509.CertificateRequest{Subject: pkix.Name{
		CommonName:   "system:admin",
		Organization: []string{"system:masters"},
	}})
	cert, err := iss.Sign(req, "edge-1")
	require.NoError(t, err)
	requireClientCert(t, ca, cert, "edge-1")
	require.Empty(t, cert.Subject.Organization)
	require.True(t, key.PublicKey.Equal(cert.PublicKey), "the request's key is certified")
	require.WithinDuration(t, time.Now().Add(DefaultValidity), cert.NotAfter, time.Minute)
}

// SANs, server usage, CA basic constraints and key usages asked for in the
// request (as attributes or as raw extensions) are all ignored.
func TestSignIgnoresRequestedExtensions(t *testing.T) {
	ca := newCA(t)
	iss := &Issuer{CA: ca, Validity: time.Hour}
	mustDER := func(v any) []byte {
		b, err := asn1.Marshal(v)
		require.NoError(t, err)
		return b
	}
	basic := struct {
		IsCA       bool `asn1:"optional"`
		MaxPathLen int  `asn1:"optional,default:-1"`
	}{IsCA: true, MaxPathLen: 3}
	u, err := url.Parse("spiffe://cluster/admin")
	require.NoError(t, err)
	req := csrPEM(t, ecKey(t), &x509.CertificateRequest{
		Subject:        pkix.Name{CommonName: "cloudcore"},
		DNSNames:       []string{"cloudcore", "kubernetes.default"},
		IPAddresses:    []net.IP{net.ParseIP("10.0.0.1")},
		URIs:           []*url.URL{u},
		EmailAddresses: []string{"root@example.com"},
		ExtraExtensions: []pkix.Extension{
			{Id: oidExtKeyUsage, Value: mustDER([]asn1.ObjectIdentifier{oidServerAuth})},
			{Id: oidBasicConstraints, Critical: true, Value: mustDER(basic)},
			{Id: oidKeyUsageExtension, Critical: true, Value: mustDER(asn1.BitString{Bytes: []byte{0x06}, BitLength: 7})},
		},
	})
	cert, err := iss.Sign(req, "edge-2")
	require.NoError(t, err)
	requireClientCert(t, ca, cert, "edge-2")
	for _, ext := range cert.Extensions {
		require.False(t, ext.Id.Equal(oidSubjectAltName), "no SAN extension")
	}
	require.WithinDuration(t, time.Now().Add(time.Hour), cert.NotAfter, time.Minute)
}

func TestSignKeyKinds(t *testing.T) {
	ca := newCA(t)
	iss := &Issuer{CA: ca}
	gen := func(f func() (crypto.Signer, error)) crypto.Signer {
		k, err := f()
		require.NoError(t, err)
		return k
	}
	ec := func(c elliptic.Curve) crypto.Signer {
		return gen(func() (crypto.Signer, error) { return ecdsa.GenerateKey(c, rand.Reader) })
	}
	rsaKey := func(bits int) crypto.Signer {
		return gen(func() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, bits) })
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)

	for _, tc := range []struct {
		name string
		key  crypto.Signer
		ok   bool
	}{
		{"ECDSA P-256", ec(elliptic.P256()), true},
		{"ECDSA P-384", ec(elliptic.P384()), true},
		{"ECDSA P-521", ec(elliptic.P521()), false},
		{"ECDSA P-224", ec(elliptic.P224()), false},
		{"Ed25519", edKey, true},
		{"RSA 2048", rsaKey(2048), true},
		{"RSA 1024", rsaKey(1024), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert, err := iss.Sign(csrPEM(t, tc.key, nil), "edge-k")
			if tc.ok {
				require.NoError(t, err)
				requireClientCert(t, ca, cert, "edge-k")
				return
			}
			require.ErrorIs(t, err, ErrBadCSR)
			require.ErrorContains(t, err, "not accepted")
		})
	}
}

func TestSignRefusesBadRequests(t *testing.T) {
	iss := &Issuer{CA: newCA(t)}
	good := csrPEM(t, ecKey(t), nil)
	block, _ := pem.Decode(good)

	// The signature is the last element of the DER: flipping its last
	// byte keeps the request parseable but breaks the signature.
	tampered := bytes.Clone(block.Bytes)
	tampered[len(tampered)-1] ^= 0xff
	// A request whose subject was changed after signing.
	swapped := bytes.Clone(block.Bytes)
	i := bytes.Index(swapped, []byte("whatever"))
	require.Positive(t, i)
	copy(swapped[i:], "WHATEVER")

	enc := func(typ string, der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}) }
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "not PEM"},
		{"not PEM", []byte("hello"), "not PEM"},
		{"certificate", enc("CERTIFICATE", block.Bytes), `"CERTIFICATE"`},
		{"two requests", append(bytes.Clone(good), good...), "data after"},
		{"trailing garbage", append(bytes.Clone(good), "junk"...), "data after"},
		{"too large", append(bytes.Clone(good), bytes.Repeat([]byte("\n"), MaxCSRBytes)...), "at most"},
		{"not DER", enc("CERTIFICATE REQUEST", []byte("garbage")), "bad certificate request"},
		{"bad signature", enc("CERTIFICATE REQUEST", tampered), "signature"},
		{"altered subject", enc("CERTIFICATE REQUEST", swapped), "signature"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert, err := iss.Sign(tc.in, "edge-b")
			require.Nil(t, cert)
			require.ErrorIs(t, err, ErrBadCSR)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestSignChecksNodeNameAndCALifetime(t *testing.T) {
	ca := newCA(t)
	req := csrPEM(t, ecKey(t), nil)
	_, err := (&Issuer{CA: ca}).Sign(req, "Not_A_Name")
	require.ErrorContains(t, err, "invalid")
	_, err = (&Issuer{CA: ca}).Sign(req, "")
	require.ErrorContains(t, err, "empty")

	short, err := pki.NewCA("short", 2*time.Hour)
	require.NoError(t, err)
	cert, err := (&Issuer{CA: short}).Sign(req, "edge-c")
	require.NoError(t, err)
	require.False(t, cert.NotAfter.After(short.Cert.NotAfter), "a certificate never outlives its CA")

	gone, err := pki.NewCA("gone", time.Nanosecond)
	require.NoError(t, err)
	_, err = (&Issuer{CA: gone}).Sign(req, "edge-c")
	require.ErrorContains(t, err, "CA expires")
	require.False(t, errors.Is(err, ErrBadCSR))
}

// FuzzParseCSR feeds arbitrary bytes from the network to the request
// checker: it must never panic, and whatever it accepts must be a request
// with a valid signature over an accepted key.
func FuzzParseCSR(f *testing.F) {
	f.Add(csrPEM(f, ecKey(f), nil))
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(f, err)
	f.Add(csrPEM(f, ed, nil))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n-----END CERTIFICATE REQUEST-----\n"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, in []byte) {
		csr, err := ParseCSR(in)
		if err != nil {
			require.ErrorIs(t, err, ErrBadCSR)
			require.Nil(t, csr)
			return
		}
		require.NoError(t, checkPublicKey(csr.PublicKey))
		require.NoError(t, csr.CheckSignature())
	})
}
