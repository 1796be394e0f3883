package logging

import (
	"bytes"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/require"
	"k8s.io/klog/v2"
)

// The Kubernetes libraries' klog lines come out through the daemon's
// logger, in its format and at its level, not in klog's beside it.
func TestKlogThroughLogger(t *testing.T) {
	var buf bytes.Buffer
	New(&buf, slog.LevelWarn)
	t.Cleanup(klog.ClearLogger)
	klog.InfoS("from klog", "key", "value")
	klog.ErrorS(nil, "klog error", "key", "value")
	klog.Flush()
	require.Contains(t, buf.String(), `level=ERROR msg="klog error" key=value`)
	require.NotContains(t, buf.String(), "from klog", "below the level")
}
