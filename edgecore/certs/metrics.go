package certs

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Register registers the holder's metric with reg: when the certificate
// it holds now expires, read at each scrape, so a renewal shows at once.
func (h *Holder) Register(reg prometheus.Registerer) error {
	g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tether_edge_certificate_expiry_timestamp_seconds",
		Help: "When the node certificate EdgeCore presents expires (its NotAfter), as a Unix time.",
	}, func() float64 {
		if leaf := h.Leaf(); leaf != nil {
			return float64(leaf.NotAfter.Unix())
		}
		return 0
	})
	if err := reg.Register(g); err != nil {
		return fmt.Errorf("register certificate metrics: %w", err)
	}
	return nil
}
