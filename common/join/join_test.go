package join

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/pki"
)

func TestTokenRoundTrip(t *testing.T) {
	ca, err := pki.NewCA("c", time.Hour)
	require.NoError(t, err)
	tok, err := NewToken(ca.Cert)
	require.NoError(t, err)
	got, err := Parse(tok.String())
	require.NoError(t, err)
	require.Equal(t, tok, got)
	require.NoError(t, got.VerifyCA(ca.Cert))
	require.True(t, SecretMatches(tok.Secret, SecretHash(tok.Secret)))
	require.False(t, SecretMatches(tok.Secret+"x", SecretHash(tok.Secret)))

	other, err := pki.NewCA("c", time.Hour)
	require.NoError(t, err)
	require.ErrorIs(t, got.VerifyCA(other.Cert), ErrCAMismatch)
	leaf, _, err := ca.Issue(pki.LeafRequest{CommonName: "n", Validity: time.Hour})
	require.NoError(t, err)
	require.ErrorIs(t, got.VerifyCA(leaf), ErrCAMismatch)
}

func TestParseRefuses(t *testing.T) {
	good := "tj1.abcdefgh." + strings.Repeat("a", 26) + "." + strings.Repeat("0", 64)
	_, err := Parse(good)
	require.NoError(t, err)
	for _, s := range []string{
		"",
		"tj2.abcdefgh." + strings.Repeat("a", 26) + "." + strings.Repeat("0", 64),
		"tj1.ABCDEFGH." + strings.Repeat("a", 26) + "." + strings.Repeat("0", 64),
		"tj1.abcdefg." + strings.Repeat("a", 26) + "." + strings.Repeat("0", 64),
		"tj1.abcdefgh." + strings.Repeat("a", 25) + "." + strings.Repeat("0", 64),
		"tj1.abcdefgh." + strings.Repeat("1", 26) + "." + strings.Repeat("0", 64),
		"tj1.abcdefgh." + strings.Repeat("a", 26) + "." + strings.Repeat("z", 64),
		"tj1.abcdefgh." + strings.Repeat("a", 26),
		good + ".extra",
	} {
		_, err := Parse(s)
		require.ErrorIs(t, err, ErrBadToken, "%q", s)
	}
}
