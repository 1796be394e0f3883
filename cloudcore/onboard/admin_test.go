package onboard

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/common/join"
)

func TestAllowCreatesAndReissues(t *testing.T) {
	c := newCluster(t)
	ca := newCA(t)
	ctx := t.Context()
	node := c.name(t, "admin")
	now := time.Date(2030, 1, 2, 3, 4, 5, 600, time.UTC)
	clock := func() time.Time { return now }

	tok, e, err := Allow(ctx, c.nodes, ca.Cert, node, AllowOptions{Labels: map[string]string{"site": "x"}, Now: clock})
	require.NoError(t, err)
	parsed, err := join.Parse(tok.String())
	require.NoError(t, err)
	require.Equal(t, tok, parsed)
	require.NoError(t, tok.VerifyCA(ca.Cert))

	got := c.get(t, node)
	require.Equal(t, e.ResourceVersion, got.ResourceVersion)
	require.True(t, got.Spec.Allowed)
	require.Equal(t, map[string]string{"site": "x"}, got.Spec.Labels)
	require.NotNil(t, got.Spec.Join)
	require.Equal(t, tok.ID, got.Spec.Join.TokenID)
	require.True(t, join.SecretMatches(tok.Secret, got.Spec.Join.SecretHash))
	require.NotContains(t, got.Spec.Join.SecretHash, tok.Secret, "the secret is never stored")
	require.True(t, now.Add(DefaultTokenTTL).Truncate(time.Second).Equal(got.Spec.Join.Expires.Time))

	// Disabled nodes come back with allow, with a new token; labels are
	// kept when none are given.
	_, err = Disable(ctx, c.nodes, node)
	require.NoError(t, err)
	disabled := c.get(t, node)
	require.False(t, disabled.Spec.Allowed)
	require.Nil(t, disabled.Spec.Join, "disabling withdraws the pending token")

	tok2, _, err := Allow(ctx, c.nodes, ca.Cert, node, AllowOptions{TokenTTL: time.Hour, Now: clock})
	require.NoError(t, err)
	require.NotEqual(t, tok.ID, tok2.ID)
	got = c.get(t, node)
	require.True(t, got.Spec.Allowed)
	require.Equal(t, map[string]string{"site": "x"}, got.Spec.Labels)
	require.Equal(t, tok2.ID, got.Spec.Join.TokenID)
	require.False(t, join.SecretMatches(tok.Secret, got.Spec.Join.SecretHash), "the old token stops working")
	require.True(t, now.Add(time.Hour).Truncate(time.Second).Equal(got.Spec.Join.Expires.Time))

	// Status (the certificate on record) is left alone by allow.
	got.Status.Certificate = &edgenode.Certificate{Serial: "abc", NotAfter: metav1.NewTime(now)}
	_, err = c.nodes.UpdateStatus(ctx, got)
	require.NoError(t, err)
	_, _, err = Allow(ctx, c.nodes, ca.Cert, node, AllowOptions{Labels: map[string]string{}})
	require.NoError(t, err)
	got = c.get(t, node)
	require.Equal(t, "abc", got.Status.Certificate.Serial)
	require.Empty(t, got.Spec.Labels, "an empty label set removes the labels")
}

func TestAllowValidates(t *testing.T) {
	c := newCluster(t)
	ca := newCA(t)
	ctx := t.Context()
	node := c.name(t, "admin-bad")
	for _, tc := range []struct {
		name string
		node string
		opts AllowOptions
		want string
	}{
		{"negative TTL", node, AllowOptions{TokenTTL: -time.Second}, "token TTL"},
		{"TTL too long", node, AllowOptions{TokenTTL: MaxTokenTTL + time.Second}, "token TTL"},
		{"bad label key", node, AllowOptions{Labels: map[string]string{"bad key": "v"}}, "label key"},
		{"bad label value", node, AllowOptions{Labels: map[string]string{"k": "bad value!"}}, "value"},
		{"bad node name", "Bad_Node", AllowOptions{}, "invalid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Allow(ctx, c.nodes, ca.Cert, tc.node, tc.opts)
			require.ErrorContains(t, err, tc.want)
		})
	}
	_, err := c.nodes.Get(ctx, node)
	require.True(t, apierrors.IsNotFound(err), "nothing written: %v", err)

	_, _, err = Allow(ctx, c.nodes, ca.Cert, node, AllowOptions{TokenTTL: MaxTokenTTL})
	require.NoError(t, err)
}

func TestParseLabels(t *testing.T) {
	l, err := ParseLabels([]string{"site=a", "tether.dev/role=gw", "empty="})
	require.NoError(t, err)
	require.Equal(t, map[string]string{"site": "a", "tether.dev/role": "gw", "empty": ""}, l)
	l, err = ParseLabels(nil)
	require.NoError(t, err)
	require.Nil(t, l)
	for _, bad := range [][]string{{"novalue"}, {"=v"}, {"a=1", "a=2"}, {"k=bad value"}} {
		_, err := ParseLabels(bad)
		require.Error(t, err, "%q", bad)
	}
}

func TestListDisableRemove(t *testing.T) {
	c := newCluster(t)
	ca := newCA(t)
	ctx := t.Context()
	a, b := c.name(t, "list-a"), c.name(t, "list-b")
	for _, n := range []string{b, a} {
		_, _, err := Allow(ctx, c.nodes, ca.Cert, n, AllowOptions{})
		require.NoError(t, err)
	}
	e := c.get(t, a)
	connected := metav1.NewTime(time.Date(2031, 5, 6, 7, 8, 9, 0, time.UTC))
	e.Status.Certificate = &edgenode.Certificate{Serial: "1f2e", NotAfter: metav1.NewTime(time.Date(2032, 1, 1, 0, 0, 0, 0, time.UTC))}
	e.Status.LastConnected = &connected
	_, err := c.nodes.UpdateStatus(ctx, e)
	require.NoError(t, err)
	_, err = Disable(ctx, c.nodes, b)
	require.NoError(t, err)

	all, err := List(ctx, c.nodes)
	require.NoError(t, err)
	var mine []*edgenode.EdgeNode
	for _, e := range all {
		if e.Name == a || e.Name == b {
			mine = append(mine, e)
		}
	}
	require.Len(t, mine, 2)
	require.Equal(t, a, mine[0].Name, "sorted by name")

	var out bytes.Buffer
	require.NoError(t, WriteTable(&out, mine, time.Now()))
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 3)
	require.Equal(t, []string{"NAME", "ALLOWED", "CERT-SERIAL", "CERT-EXPIRES", "LAST-CONNECTED", "TOKEN-PENDING"}, strings.Fields(lines[0]))
	require.Equal(t, []string{a, "true", "1f2e", "2032-01-01T00:00:00Z", "2031-05-06T07:08:09Z", "until"}, strings.Fields(lines[1])[:6])
	require.Equal(t, []string{b, "false", "-", "-", "never", "no"}, strings.Fields(lines[2]))

	out.Reset()
	require.NoError(t, WriteTable(&out, mine[:1], time.Now().Add(48*time.Hour)))
	require.Contains(t, out.String(), "expired")

	require.NoError(t, Remove(ctx, c.nodes, a))
	_, err = c.nodes.Get(ctx, a)
	require.True(t, apierrors.IsNotFound(err))
	require.ErrorIs(t, Remove(ctx, c.nodes, a), ErrNotWhitelisted)
	_, err = Disable(ctx, c.nodes, a)
	require.ErrorIs(t, err, ErrNotWhitelisted)
}

// Re-enabling a disabled node withdraws its certificate (current and
// previous); allowing a node that is still allowed keeps it.
func TestAllowAfterDisableWithdrawsCertificate(t *testing.T) {
	c := newCluster(t)
	ca := newCA(t)
	iss := &Issuer{CA: ca}
	ctx := t.Context()
	node := c.name(t, "reallow")
	_, _, err := Allow(ctx, c.nodes, ca.Cert, node, AllowOptions{})
	require.NoError(t, err)
	cert, err := iss.Sign(csrPEM(t, ecKey(t), nil), node)
	require.NoError(t, err)
	require.NoError(t, recordCertificate(ctx, c.nodes, nil, node, func(e *edgenode.EdgeNode) error {
		e.Status.Certificate = certRecord(cert)
		e.Status.Previous = &edgenode.Certificate{Serial: "01", NotAfter: metav1.NewTime(time.Now().Add(time.Hour))}
		return nil
	}))

	// Still allowed: a new token, the certificate stays until a join.
	_, _, err = Allow(ctx, c.nodes, ca.Cert, node, AllowOptions{})
	require.NoError(t, err)
	require.NotNil(t, c.get(t, node).Status.Certificate)

	_, err = Disable(ctx, c.nodes, node)
	require.NoError(t, err)
	_, e, err := Allow(ctx, c.nodes, ca.Cert, node, AllowOptions{})
	require.NoError(t, err)
	require.True(t, e.Spec.Allowed)
	got := c.get(t, node)
	require.Nil(t, got.Status.Certificate)
	require.Nil(t, got.Status.Previous)
	_, err = got.Accepts(cert.SerialNumber.Text(16), time.Now())
	require.ErrorContains(t, err, "no certificate on record")
}
