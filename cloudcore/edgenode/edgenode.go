// Package edgenode is the whitelist entry of an edge node: the EdgeNode
// custom resource (edge.tether.dev/v1alpha1, cluster-scoped; its CRD is
// build/crds/edgenode.yaml), its Go types and a small client over the
// dynamic client. It decides nothing; onboarding and the tunnel's
// authorisation read and write it.
package edgenode

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// GVR is the resource of EdgeNodes.
var GVR = schema.GroupVersionResource{Group: "edge.tether.dev", Version: "v1alpha1", Resource: "edgenodes"}

// APIVersion and Kind of EdgeNodes.
const (
	APIVersion = "edge.tether.dev/v1alpha1"
	Kind       = "EdgeNode"
)

// EdgeNode is one whitelist entry.
type EdgeNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              Spec   `json:"spec"`
	Status            Status `json:"status,omitempty"`
}

// Spec is what the operator decides.
type Spec struct {
	// Allowed says whether the node may join, connect and renew.
	Allowed bool `json:"allowed"`
	// Labels are applied to the node's Node object.
	Labels map[string]string `json:"labels,omitempty"`
	// Taints are applied to the node's Node object at each registration.
	Taints []corev1.Taint `json:"taints,omitempty"`
	// Join is the pending join token, if any.
	Join *JoinToken `json:"join,omitempty"`
}

// JoinToken is a pending token: its id, the SHA-256 of its secret, and
// when it expires. The secret itself is never stored.
type JoinToken struct {
	TokenID    string      `json:"tokenID"`
	SecretHash string      `json:"secretHash"`
	Expires    metav1.Time `json:"expires"`
}

// Status is what CloudCore observed.
type Status struct {
	// Certificate is the node's current certificate.
	Certificate *Certificate `json:"certificate,omitempty"`
	// Previous is the certificate the last renewal replaced, still accepted
	// because the node may not have received the new one (a lost reply, a
	// crash before it was stored). Its NotAfter is when that acceptance
	// ends: the earlier of the certificate's own expiry and the renewal
	// time plus the grace period. It is cleared when the node connects
	// with Certificate, and by a join or re-enabling, which accept no
	// older certificate.
	Previous *Certificate `json:"previous,omitempty"`
	// LastConnected is when the node last opened a session (in seconds),
	// written with Connection; it stays when the session ends.
	LastConnected *metav1.Time `json:"lastConnected,omitempty"`
	// Connection is the node's live session, nil when it has none
	// (ConnectionWriter keeps it).
	Connection *Connection `json:"connection,omitempty"`
	// ObjectsHeld is how many objects the node holds as CloudCore's sync
	// knows it (acked), written once its sync is idle after the
	// reconcile, then when it changed, at most every 10 s. It stays when
	// the session ends.
	ObjectsHeld *int64 `json:"objectsHeld,omitempty"`
}

// Connection is where a node's live session is.
type Connection struct {
	// Replica is the CloudCore that holds the session (its host name).
	Replica string `json:"replica"`
	// Transport is quic or websocket.
	Transport string `json:"transport"`
	// RemoteAddr is the edge's address (host:port) as CloudCore's socket
	// saw it when the session started: behind a NAT or a load balancer
	// that does not keep the source, theirs. A QUIC path migration later
	// in the session is not recorded. Empty in objects written before it
	// was recorded.
	RemoteAddr string `json:"remoteAddr,omitempty"`
	// Session is the session's id, so that the end of an older session
	// never clears a newer one.
	Session string `json:"session"`
	// Since is when the session started.
	Since metav1.Time `json:"since"`
}

// Certificate identifies the one certificate the node may use.
type Certificate struct {
	Serial   string      `json:"serial"`
	NotAfter metav1.Time `json:"notAfter"`
}

// FromUnstructured converts a dynamic object.
func FromUnstructured(u *unstructured.Unstructured) (*EdgeNode, error) {
	var e EdgeNode
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &e); err != nil {
		return nil, fmt.Errorf("decode EdgeNode %s: %w", u.GetName(), err)
	}
	return &e, nil
}

// ToUnstructured converts for the dynamic client.
func ToUnstructured(e *EdgeNode) (*unstructured.Unstructured, error) {
	e.APIVersion, e.Kind = APIVersion, Kind
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(e)
	if err != nil {
		return nil, fmt.Errorf("encode EdgeNode %s: %w", e.Name, err)
	}
	return &unstructured.Unstructured{Object: obj}, nil
}

// Client reads and writes EdgeNodes.
type Client struct {
	res dynamic.NamespaceableResourceInterface
}

// NewClient wraps a dynamic client.
func NewClient(d dynamic.Interface) *Client { return &Client{res: d.Resource(GVR)} }

// Get reads one EdgeNode.
func (c *Client) Get(ctx context.Context, name string) (*EdgeNode, error) {
	u, err := c.res.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return FromUnstructured(u)
}

// List reads every EdgeNode.
func (c *Client) List(ctx context.Context) ([]*EdgeNode, error) {
	l, err := c.res.List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	out := make([]*EdgeNode, 0, len(l.Items))
	for i := range l.Items {
		e, err := FromUnstructured(&l.Items[i])
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// Create creates an EdgeNode.
func (c *Client) Create(ctx context.Context, e *EdgeNode) (*EdgeNode, error) {
	u, err := ToUnstructured(e)
	if err != nil {
		return nil, err
	}
	out, err := c.res.Create(ctx, u, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	return FromUnstructured(out)
}

// Update writes the spec. It fails with a conflict if e is not the latest
// version: callers rely on that to use a token only once.
func (c *Client) Update(ctx context.Context, e *EdgeNode) (*EdgeNode, error) {
	u, err := ToUnstructured(e)
	if err != nil {
		return nil, err
	}
	out, err := c.res.Update(ctx, u, metav1.UpdateOptions{})
	if err != nil {
		return nil, err
	}
	return FromUnstructured(out)
}

// UpdateStatus writes the status, with the same conflict rule as Update.
func (c *Client) UpdateStatus(ctx context.Context, e *EdgeNode) (*EdgeNode, error) {
	u, err := ToUnstructured(e)
	if err != nil {
		return nil, err
	}
	out, err := c.res.UpdateStatus(ctx, u, metav1.UpdateOptions{})
	if err != nil {
		return nil, err
	}
	return FromUnstructured(out)
}

// Delete removes an EdgeNode.
func (c *Client) Delete(ctx context.Context, name string) error {
	return c.res.Delete(ctx, name, metav1.DeleteOptions{})
}

// Resource returns the dynamic resource client, for informers.
func (c *Client) Resource() dynamic.NamespaceableResourceInterface { return c.res }

// Accepts reports until when the certificate with serial may keep a
// session, or why it may not now: the node must be allowed, and serial
// must be its current certificate (until that expires) or the previous one
// within its grace (see Status.Previous).
func (e *EdgeNode) Accepts(serial string, now time.Time) (time.Time, error) {
	if !e.Spec.Allowed {
		return time.Time{}, fmt.Errorf("node %q is disabled on the whitelist", e.Name)
	}
	cur, prev := e.Status.Certificate, e.Status.Previous
	var c *Certificate
	switch {
	case cur == nil:
		return time.Time{}, fmt.Errorf("node %q has no certificate on record (not joined)", e.Name)
	case cur.Serial == serial:
		c = cur
	case prev != nil && prev.Serial == serial:
		c = prev
		if now.After(c.NotAfter.Time) {
			return time.Time{}, fmt.Errorf("certificate serial %s of node %q was replaced by a renewal and its grace ended at %s",
				serial, e.Name, c.NotAfter.Time.UTC().Format(time.RFC3339))
		}
	default:
		return time.Time{}, fmt.Errorf("certificate serial %s of node %q is not its current one (superseded by a rotation or a new join)", serial, e.Name)
	}
	if now.After(c.NotAfter.Time) {
		return time.Time{}, fmt.Errorf("certificate of node %q expired at %s", e.Name, c.NotAfter.Time.UTC().Format(time.RFC3339))
	}
	return c.NotAfter.Time, nil
}
