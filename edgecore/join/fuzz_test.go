package join

import (
	"testing"
	"time"

	"github.com/tetheredge/tether/common/pki"
)

// FuzzValidateIssued feeds bytes from the network (the CA download and the
// issued certificate) to the PEM and certificate checks: they must fail
// cleanly, and anything accepted must meet every check.
func FuzzValidateIssued(f *testing.F) {
	ca, err := pki.NewCA("fuzz CA", time.Hour)
	if err != nil {
		f.Fatal(err)
	}
	cert, key, err := ca.Issue(pki.LeafRequest{CommonName: testNode, Validity: time.Hour})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(pki.EncodeCert(cert))
	f.Add(pki.EncodeCert(ca.Cert))
	now := time.Now()
	f.Fuzz(func(t *testing.T, b []byte) {
		if c, err := parseOneCert(b); err == nil && c == nil {
			t.Fatal("parseOneCert returned neither a certificate nor an error")
		}
		leaf, err := validateIssuedAt(b, ca.Cert, testNode, key.Public(), now)
		if err != nil {
			return
		}
		if leaf.Subject.CommonName != testNode || leaf.IsCA || now.After(leaf.NotAfter) {
			t.Fatalf("accepted a certificate that fails the checks: %+v", leaf.Subject)
		}
	})
}
