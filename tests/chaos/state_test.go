package chaos

import (
	"context"
	"database/sql"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	_ "github.com/mattn/go-sqlite3" // read-only reads of the edges' stores
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/common/objsync"
)

// held is one object version: its UID and resourceVersion.
type held struct {
	UID, RV string
}

func (h held) String() string { return h.UID + "@" + h.RV }

// edgeState is an edge store read from its file: objects by key, and the
// keys waiting in the outbox.
type edgeState struct {
	objects map[string]held
	outbox  []string
}

// readStore reads an edge's SQLite file read-only; the edge may be running
// (WAL lets a reader in) or dead.
func readStore(ctx context.Context, path string) (edgeState, error) {
	db, err := sql.Open("sqlite3", "file:"+path+"?mode=ro&_busy_timeout=5000")
	if err != nil {
		return edgeState{}, err
	}
	defer db.Close()
	tx, err := db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return edgeState{}, fmt.Errorf("read %s: %w", path, err)
	}
	defer func() { _ = tx.Rollback() }()
	st := edgeState{objects: map[string]held{}}
	rows, err := tx.QueryContext(ctx, `SELECT key, uid, resource_version FROM objects`)
	if err != nil {
		return edgeState{}, fmt.Errorf("read objects of %s: %w", path, err)
	}
	for rows.Next() {
		var k string
		var h held
		if err := rows.Scan(&k, &h.UID, &h.RV); err != nil {
			rows.Close()
			return edgeState{}, err
		}
		st.objects[k] = h
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return edgeState{}, err
	}
	rows, err = tx.QueryContext(ctx, `SELECT key FROM outbox ORDER BY seq`)
	if err != nil {
		return edgeState{}, fmt.Errorf("read outbox of %s: %w", path, err)
	}
	defer rows.Close()
	for rows.Next() {
		var k string
		if err := rows.Scan(&k); err != nil {
			return edgeState{}, err
		}
		st.outbox = append(st.outbox, k)
	}
	return st, rows.Err()
}

func keyOf(kind, ns, name string) string {
	return objsync.Key{Kind: kind, Namespace: ns, Name: name}.String()
}

// wanted is what the API server says node must hold, by the catalog's
// rule for the objects this test makes: the Node, the pods bound to it, and
// the ConfigMaps and Secrets those pods mount that exist. It also returns
// the Node.
func wanted(ctx context.Context, cs kubernetes.Interface, ns, node string) (map[string]held, *corev1.Node, error) {
	out := map[string]held{}
	n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("get node %s: %w", node, err)
	}
	out[keyOf("Node", "", node)] = held{string(n.UID), n.ResourceVersion}
	pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, err
	}
	refs := map[string]bool{}
	for _, p := range pods.Items {
		if p.Spec.NodeName != node {
			continue
		}
		out[keyOf("Pod", ns, p.Name)] = held{string(p.UID), p.ResourceVersion}
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		for _, v := range p.Spec.Volumes {
			if v.ConfigMap != nil {
				refs[keyOf("ConfigMap", ns, v.ConfigMap.Name)] = true
			}
			if v.Secret != nil {
				refs[keyOf("Secret", ns, v.Secret.SecretName)] = true
			}
		}
	}
	cms, err := cs.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, err
	}
	for _, cm := range cms.Items {
		if k := keyOf("ConfigMap", ns, cm.Name); refs[k] {
			out[k] = held{string(cm.UID), cm.ResourceVersion}
		}
	}
	secrets, err := cs.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, err
	}
	for _, s := range secrets.Items {
		if k := keyOf("Secret", ns, s.Name); refs[k] {
			out[k] = held{string(s.UID), s.ResourceVersion}
		}
	}
	return out, n, nil
}

// differing returns the keys whose state differs between want and got.
func differing(want, got map[string]held) []string {
	var out []string
	for k, w := range want {
		if g, ok := got[k]; !ok || g != w {
			out = append(out, k)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// diff describes, both ways, how got differs from want; "" when equal.
func diff(want, got map[string]held) string {
	var missing, extra, wrong []string
	for _, k := range slices.Sorted(maps.Keys(want)) {
		g, ok := got[k]
		switch {
		case !ok:
			missing = append(missing, fmt.Sprintf("%s (want %s)", k, want[k]))
		case g != want[k]:
			wrong = append(wrong, fmt.Sprintf("%s (want %s, holds %s)", k, want[k], g))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(got)) {
		if _, ok := want[k]; !ok {
			extra = append(extra, fmt.Sprintf("%s (holds %s)", k, got[k]))
		}
	}
	if len(missing)+len(extra)+len(wrong) == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d objects wanted, %d held: %d missing, %d not wanted, %d at another version", len(want), len(got), len(missing), len(extra), len(wrong))
	for _, part := range []struct {
		name string
		keys []string
	}{{"missing", missing}, {"not wanted", extra}, {"other version", wrong}} {
		for i, k := range part.keys {
			if i == 10 {
				fmt.Fprintf(&b, "\n    %s: ... %d more", part.name, len(part.keys)-i)
				break
			}
			fmt.Fprintf(&b, "\n    %s: %s", part.name, k)
		}
	}
	return b.String()
}

// nodeReady says why node is not Ready with a heartbeat at or after since,
// or "" when it is.
func nodeReady(n *corev1.Node, since time.Time) string {
	for _, c := range n.Status.Conditions {
		if c.Type != corev1.NodeReady {
			continue
		}
		if c.Status != corev1.ConditionTrue {
			return fmt.Sprintf("Ready=%s (%s: %s)", c.Status, c.Reason, c.Message)
		}
		if c.LastHeartbeatTime.Time.Before(since.Truncate(time.Second)) {
			return fmt.Sprintf("Ready=True but its last heartbeat %s is older than the end of the faults %s",
				c.LastHeartbeatTime.Format(time.StampMilli), since.Format(time.StampMilli))
		}
		return ""
	}
	return "no Ready condition"
}
