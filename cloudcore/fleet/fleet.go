// Package fleet is the operator's view of the edge nodes, each one's state
// at a glance (`cloudcore admin list`): from its EdgeNode (allowed, the
// live session CloudCore recorded, the certificate, the objects held),
// its Node's Lease (last seen) and the pods bound to it (running pods and
// VMs). It only reads, with one list per resource, whatever the number
// of nodes.
package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/vm"
)

// Edge is one edge node's state.
type Edge struct {
	Name    string `json:"name"`
	Allowed bool   `json:"allowed"`
	// Connection is its live session as CloudCore recorded it; nil when
	// it has none.
	Connection *edgenode.Connection `json:"connection,omitempty"`
	// LastConnected is when it last opened a session.
	LastConnected *time.Time `json:"lastConnected,omitempty"`
	// LastSeen is its Node Lease's renewTime: the edge's own heartbeat,
	// or CloudCore's in its place while offline autonomy covers it.
	LastSeen *time.Time `json:"lastSeen,omitempty"`
	// CertSerial and CertExpires are its current certificate's.
	CertSerial  string     `json:"certSerial,omitempty"`
	CertExpires *time.Time `json:"certExpires,omitempty"`
	// TokenExpires is when its pending join token expires, if it has one.
	TokenExpires *time.Time `json:"tokenExpires,omitempty"`
	// ObjectsHeld is how many objects it holds, as CloudCore last wrote it.
	ObjectsHeld *int64 `json:"objectsHeld,omitempty"`
	// Pods and VMs are the pods bound to it that are Running, VMs being
	// those of the VM runtime class.
	Pods int `json:"podsRunning"`
	VMs  int `json:"vmsRunning"`
}

// listChunk is the page size of the lists.
const listChunk = 500

// List reads every edge node's state.
func List(ctx context.Context, kube kubernetes.Interface, nodes *edgenode.Client) ([]Edge, error) {
	ens, err := nodes.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list edge nodes: %w", err)
	}
	out := make([]Edge, 0, len(ens))
	byName := map[string]int{}
	for _, e := range ens {
		r := Edge{Name: e.Name, Allowed: e.Spec.Allowed, Connection: e.Status.Connection, ObjectsHeld: e.Status.ObjectsHeld}
		r.LastConnected = timeOf(e.Status.LastConnected)
		if c := e.Status.Certificate; c != nil {
			r.CertSerial, r.CertExpires = c.Serial, timeOf(&c.NotAfter)
		}
		if j := e.Spec.Join; j != nil {
			r.TokenExpires = timeOf(&j.Expires)
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b Edge) int { return strings.Compare(a.Name, b.Name) })
	for i := range out {
		byName[out[i].Name] = i
	}
	if err := eachPage(ctx, func(opts metav1.ListOptions) (string, error) {
		l, err := kube.CoordinationV1().Leases(corev1.NamespaceNodeLease).List(ctx, opts)
		if err != nil {
			return "", fmt.Errorf("list node leases: %w", err)
		}
		for _, lease := range l.Items {
			if i, ok := byName[lease.Name]; ok && lease.Spec.RenewTime != nil {
				t := lease.Spec.RenewTime.Time
				out[i].LastSeen = &t
			}
		}
		return l.Continue, nil
	}); err != nil {
		return nil, err
	}
	if err := eachPage(ctx, func(opts metav1.ListOptions) (string, error) {
		// Only running pods bound to a node: the API server filters.
		opts.FieldSelector = "status.phase=Running,spec.nodeName!="
		l, err := kube.CoreV1().Pods(metav1.NamespaceAll).List(ctx, opts)
		if err != nil {
			return "", fmt.Errorf("list running pods: %w", err)
		}
		for _, p := range l.Items {
			i, ok := byName[p.Spec.NodeName]
			if !ok {
				continue
			}
			if rc := p.Spec.RuntimeClassName; rc != nil && *rc == vm.RuntimeClassName {
				out[i].VMs++
			} else {
				out[i].Pods++
			}
		}
		return l.Continue, nil
	}); err != nil {
		return nil, err
	}
	return out, nil
}

// eachPage calls list with each page's options until it returns no
// continue token.
func eachPage(ctx context.Context, list func(metav1.ListOptions) (string, error)) error {
	opts := metav1.ListOptions{Limit: listChunk}
	for {
		next, err := list(opts)
		if err != nil {
			return err
		}
		if next == "" || ctx.Err() != nil {
			return ctx.Err()
		}
		opts.Continue = next
	}
}

func timeOf(t *metav1.Time) *time.Time {
	if t == nil || t.IsZero() {
		return nil
	}
	v := t.Time
	return &v
}

// Formats of Write.
const (
	FormatTable = ""
	FormatWide  = "wide"
	FormatJSON  = "json"
)

// Write writes edges in format: a table (ages relative to now), a wider
// one (with the replica and the edge's address, as kubectl keeps
// addresses to -o wide), or JSON (RFC 3339 times).
func Write(w io.Writer, edges []Edge, format string, now time.Time) error {
	switch format {
	case FormatJSON:
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(edges); err != nil {
			return fmt.Errorf("write json: %w", err)
		}
		return nil
	case FormatTable, FormatWide:
	default:
		return fmt.Errorf("output format %q: want wide or json (or none, a table)", format)
	}
	wide := format == FormatWide
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	head := "NAME\tALLOWED\tCONNECTED\tSINCE\tLAST-SEEN\tCERT-EXPIRES\tOBJECTS\tPODS\tVMS"
	if wide {
		head += "\tREPLICA\tADDRESS\tSESSION\tCERT-SERIAL\tLAST-CONNECTED\tTOKEN"
	}
	fmt.Fprintln(tw, head)
	for _, e := range edges {
		connected, since := "no", "-"
		if c := e.Connection; c != nil {
			connected, since = c.Transport, age(now, &c.Since.Time)
			if !wide {
				connected += "@" + c.Replica
			}
		}
		objects := "-"
		if e.ObjectsHeld != nil {
			objects = strconv.FormatInt(*e.ObjectsHeld, 10)
		}
		expires := "-"
		if e.CertExpires != nil {
			expires = e.CertExpires.UTC().Format(time.RFC3339)
			if now.After(*e.CertExpires) {
				expires += " (expired)"
			}
		}
		fmt.Fprintf(tw, "%s\t%t\t%s\t%s\t%s\t%s\t%s\t%d\t%d", e.Name, e.Allowed, connected, since, age(now, e.LastSeen), expires, objects, e.Pods, e.VMs)
		if wide {
			replica, addr, session := "-", "-", "-"
			if c := e.Connection; c != nil {
				replica, session = c.Replica, c.Session
				if c.RemoteAddr != "" {
					addr = c.RemoteAddr
				}
			}
			serial, token := "-", "none"
			if e.CertSerial != "" {
				serial = e.CertSerial
			}
			if e.TokenExpires != nil {
				token = "until " + e.TokenExpires.UTC().Format(time.RFC3339)
				if now.After(*e.TokenExpires) {
					token = "expired"
				}
			}
			fmt.Fprintf(tw, "\t%s\t%s\t%s\t%s\t%s\t%s", replica, addr, session, serial, age(now, e.LastConnected), token)
		}
		fmt.Fprintln(tw)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write table: %w", err)
	}
	return nil
}

// age is how long before now t was, as kubectl shows ages ("-" for none).
func age(now time.Time, t *time.Time) string {
	if t == nil {
		return "-"
	}
	d := now.Sub(*t)
	switch {
	case d < 0:
		return "0s"
	case d < 2*time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < 2*time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}
