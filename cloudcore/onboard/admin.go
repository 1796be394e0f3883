package onboard

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/util/retry"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/common/join"
)

// Join token lifetimes.
const (
	DefaultTokenTTL = 24 * time.Hour
	MaxTokenTTL     = 30 * 24 * time.Hour
)

// ErrNotWhitelisted is wrapped when an operator names a node that has no
// EdgeNode.
var ErrNotWhitelisted = errors.New("onboard: node is not on the whitelist")

// AllowOptions are the choices of Allow.
type AllowOptions struct {
	// Labels replace the node's labels. Nil keeps those of an existing
	// EdgeNode; an empty non-nil map removes them.
	Labels map[string]string
	// TokenTTL is how long the join token is valid: zero means
	// DefaultTokenTTL, at most MaxTokenTTL.
	TokenTTL time.Duration
	// Now is the clock the token's expiry counts from. Nil means time.Now.
	Now func() time.Time
}

// Allow puts node on the whitelist, or re-enables it, with a fresh join
// token for the cluster CA ca, and returns the token (whose secret is
// stored nowhere: only its hash is in the EdgeNode) and the EdgeNode as
// written. A token issued earlier for the node stops working. Re-enabling
// a disabled node withdraws its certificate: it must join again with the
// new token. An allowed node keeps its certificate until it joins again.
func Allow(ctx context.Context, nodes *edgenode.Client, ca *x509.Certificate, node string, opts AllowOptions) (join.Token, *edgenode.EdgeNode, error) {
	if err := validateNodeName(node); err != nil {
		return join.Token{}, nil, err
	}
	if err := ValidateLabels(opts.Labels); err != nil {
		return join.Token{}, nil, err
	}
	ttl := opts.TokenTTL
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if err := ValidateTokenTTL(ttl); err != nil {
		return join.Token{}, nil, err
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	tok, err := join.NewToken(ca)
	if err != nil {
		return join.Token{}, nil, err
	}
	pending := &edgenode.JoinToken{
		TokenID:    tok.ID,
		SecretHash: join.SecretHash(tok.Secret),
		// Stored to the second: round down so the token never outlives
		// what the operator asked for.
		Expires: metav1.NewTime(now().Add(ttl).Truncate(time.Second)),
	}
	var written *edgenode.EdgeNode
	err = retry.OnError(retry.DefaultRetry, func(err error) bool {
		// Lost a race: with another writer of an existing node, or with
		// another creator of a new one.
		return apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err)
	}, func() error {
		e, err := nodes.Get(ctx, node)
		if apierrors.IsNotFound(err) {
			e = &edgenode.EdgeNode{
				ObjectMeta: metav1.ObjectMeta{Name: node},
				Spec:       edgenode.Spec{Allowed: true, Labels: opts.Labels, Join: pending},
			}
			written, err = nodes.Create(ctx, e)
			return err
		}
		if err != nil {
			return err
		}
		if !e.Spec.Allowed && (e.Status.Certificate != nil || e.Status.Previous != nil) {
			// Re-enabling a disabled node must not make the certificate it
			// was disabled with valid again: the node joins anew. The
			// certificate is withdrawn while the node is still disabled, so
			// that no moment accepts it; if enabling fails after this, the
			// node stays disabled.
			e.Status.Certificate, e.Status.Previous = nil, nil
			if e, err = nodes.UpdateStatus(ctx, e); err != nil {
				return err
			}
		}
		e.Spec.Allowed = true
		e.Spec.Join = pending
		if opts.Labels != nil {
			e.Spec.Labels = opts.Labels
		}
		written, err = nodes.Update(ctx, e)
		return err
	})
	if err != nil {
		return join.Token{}, nil, fmt.Errorf("allow node %s: %w", node, err)
	}
	return tok, written, nil
}

// Disable keeps node on the whitelist but refuses its joins, connections
// and renewals, and withdraws its pending join token. Its live session, if
// any, is closed by the whitelist when it sees the change.
func Disable(ctx context.Context, nodes *edgenode.Client, node string) (*edgenode.EdgeNode, error) {
	var written *edgenode.EdgeNode
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		e, err := nodes.Get(ctx, node)
		if err != nil {
			return err
		}
		e.Spec.Allowed = false
		e.Spec.Join = nil
		written, err = nodes.Update(ctx, e)
		return err
	})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("disable node %s: %w", node, ErrNotWhitelisted)
	}
	if err != nil {
		return nil, fmt.Errorf("disable node %s: %w", node, err)
	}
	return written, nil
}

// Remove deletes node's EdgeNode: it can no longer join or connect, and
// joining again needs a new Allow.
func Remove(ctx context.Context, nodes *edgenode.Client, node string) error {
	err := nodes.Delete(ctx, node)
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("remove node %s: %w", node, ErrNotWhitelisted)
	}
	if err != nil {
		return fmt.Errorf("remove node %s: %w", node, err)
	}
	return nil
}

// List returns every EdgeNode, sorted by name.
func List(ctx context.Context, nodes *edgenode.Client) ([]*edgenode.EdgeNode, error) {
	l, err := nodes.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list edge nodes: %w", err)
	}
	slices.SortFunc(l, func(a, b *edgenode.EdgeNode) int { return strings.Compare(a.Name, b.Name) })
	return l, nil
}

// WriteTable writes nodes as the table of `cloudcore admin list`; now
// decides whether a pending token has expired.
func WriteTable(w io.Writer, nodes []*edgenode.EdgeNode, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "NAME\tALLOWED\tCERT-SERIAL\tCERT-EXPIRES\tLAST-CONNECTED\tTOKEN-PENDING")
	for _, e := range nodes {
		serial, expires, connected, pending := "-", "-", "never", "no"
		if c := e.Status.Certificate; c != nil {
			serial, expires = c.Serial, formatTime(c.NotAfter.Time)
		}
		if t := e.Status.LastConnected; t != nil {
			connected = formatTime(t.Time)
		}
		if j := e.Spec.Join; j != nil {
			pending = "until " + formatTime(j.Expires.Time)
			if now.After(j.Expires.Time) {
				pending = "expired"
			}
		}
		fmt.Fprintf(tw, "%s\t%t\t%s\t%s\t%s\t%s\n", e.Name, e.Spec.Allowed, serial, expires, connected, pending)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write table: %w", err)
	}
	return nil
}

func formatTime(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// ValidateTokenTTL checks a join token lifetime: positive, at most
// MaxTokenTTL.
func ValidateTokenTTL(ttl time.Duration) error {
	if ttl <= 0 || ttl > MaxTokenTTL {
		return fmt.Errorf("token TTL %s: want more than 0 and at most %s", ttl, MaxTokenTTL)
	}
	return nil
}

// ValidateLabels checks node labels as Kubernetes would on the Node.
func ValidateLabels(labels map[string]string) error {
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return fmt.Errorf("label key %q: %s", k, strings.Join(errs, "; "))
		}
		if errs := validation.IsValidLabelValue(labels[k]); len(errs) > 0 {
			return fmt.Errorf("label %s value %q: %s", k, labels[k], strings.Join(errs, "; "))
		}
	}
	return nil
}

// ParseLabels turns k=v strings, as given on a command line, into labels.
func ParseLabels(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	labels := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("label %q: want key=value", kv)
		}
		if _, dup := labels[k]; dup {
			return nil, fmt.Errorf("label %q given twice", k)
		}
		labels[k] = v
	}
	if err := ValidateLabels(labels); err != nil {
		return nil, err
	}
	return labels, nil
}
