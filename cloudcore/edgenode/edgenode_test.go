package edgenode

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestAccepts(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) metav1.Time { return metav1.NewTime(now.Add(d)) }
	cur := &Certificate{Serial: "c", NotAfter: at(48 * time.Hour)}
	prev := &Certificate{Serial: "p", NotAfter: at(time.Hour)}
	for _, tc := range []struct {
		name    string
		e       EdgeNode
		serial  string
		until   time.Time
		wantErr string
	}{
		{name: "current", e: EdgeNode{Spec: Spec{Allowed: true}, Status: Status{Certificate: cur}}, serial: "c", until: cur.NotAfter.Time},
		{name: "previous within grace", e: EdgeNode{Spec: Spec{Allowed: true}, Status: Status{Certificate: cur, Previous: prev}}, serial: "p", until: prev.NotAfter.Time},
		{name: "previous after grace", e: EdgeNode{Spec: Spec{Allowed: true}, Status: Status{Certificate: cur, Previous: &Certificate{Serial: "p", NotAfter: at(-time.Second)}}}, serial: "p", wantErr: "grace ended"},
		{name: "other serial", e: EdgeNode{Spec: Spec{Allowed: true}, Status: Status{Certificate: cur, Previous: prev}}, serial: "x", wantErr: "not its current one"},
		{name: "disabled", e: EdgeNode{Spec: Spec{Allowed: false}, Status: Status{Certificate: cur}}, serial: "c", wantErr: "disabled"},
		{name: "disabled, previous", e: EdgeNode{Spec: Spec{Allowed: false}, Status: Status{Certificate: cur, Previous: prev}}, serial: "p", wantErr: "disabled"},
		{name: "not joined", e: EdgeNode{Spec: Spec{Allowed: true}}, serial: "c", wantErr: "no certificate on record"},
		{name: "not joined, stale previous", e: EdgeNode{Spec: Spec{Allowed: true}, Status: Status{Previous: prev}}, serial: "p", wantErr: "no certificate on record"},
		{name: "current expired", e: EdgeNode{Spec: Spec{Allowed: true}, Status: Status{Certificate: &Certificate{Serial: "c", NotAfter: at(-time.Second)}}}, serial: "c", wantErr: "expired"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			until, err := tc.e.Accepts(tc.serial, now)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.True(t, tc.until.Equal(until), "until %s, want %s", until, tc.until)
		})
	}
}
