package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"

	"github.com/tetheredge/tether/cloudcore/edgenode"
)

// TestEdgeNodePrinterColumns checks what `kubectl get edgenodes` prints:
// the real API server's Table for the CRD in build/crds. The certificate
// expiry is in the future, which a `date` column cannot show as an age
// (the server prints "<invalid>"), so it is the RFC 3339 time; the last
// connection is in the past and shown as an age.
func TestEdgeNodePrinterColumns(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	dyn, err := dynamic.NewForConfig(env.Config)
	require.NoError(t, err)
	nodes := edgenode.NewClient(dyn)
	ctx := context.Background()
	const name = "edge-printer"
	t.Cleanup(func() { _ = nodes.Delete(context.Background(), name) })
	e, err := nodes.Create(ctx, &edgenode.EdgeNode{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: edgenode.Spec{Allowed: true}})
	require.NoError(t, err)
	expires := time.Now().Add(90 * 24 * time.Hour).UTC().Truncate(time.Second)
	connected := metav1.NewTime(time.Now().Add(-5 * time.Hour).Truncate(time.Second))
	e.Status = edgenode.Status{Certificate: &edgenode.Certificate{Serial: "0a1b", NotAfter: metav1.NewTime(expires)}, LastConnected: &connected}
	_, err = nodes.UpdateStatus(ctx, e)
	require.NoError(t, err)

	raw, err := cs.Discovery().RESTClient().Get().AbsPath("/apis", edgenode.GVR.Group, edgenode.GVR.Version, edgenode.GVR.Resource, name).
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").Do(ctx).Raw()
	require.NoError(t, err)
	var table metav1.Table
	require.NoError(t, json.Unmarshal(raw, &table))
	require.Len(t, table.Rows, 1)
	cells := table.Rows[0].Cells
	require.Equal(t, []any{name, true, expires.Format(time.RFC3339)}, cells[:3])
	require.Equal(t, "5h", cells[3], "a past time is shown as an age")
	var cols []string
	for _, col := range table.ColumnDefinitions {
		cols = append(cols, fmt.Sprintf("%s/%s", col.Name, col.Type))
	}
	require.Equal(t, []string{"Name/string", "Allowed/boolean", "Cert-Expires/string", "Last-Connected/date", "Age/date"}, cols)
}
