package onboard

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/tetheredge/tether/cloudcore/edgenode"
)

// RenewerConfig configures a Renewer.
type RenewerConfig struct {
	// EdgeNodes is the whitelist. Required.
	EdgeNodes *edgenode.Client
	// Issuer signs the new certificates. Required.
	Issuer *Issuer
	// Now is the clock for the current certificate's expiry. Nil means
	// time.Now.
	Now func() time.Time
	// Logger receives the renewals' logs. Nil discards them.
	Logger *slog.Logger
	// Registerer receives the renewal metrics. Nil registers them nowhere.
	Registerer prometheus.Registerer
}

// Renewer renews the certificate of a node over its live session: the
// session's certificate vouches for the node, so no token is needed, but
// only the node's current certificate may be renewed, and only while the
// node is allowed. The new certificate replaces it as the current one, so
// the old one stops being accepted at the next connection.
type Renewer struct {
	cfg     RenewerConfig
	logger  *slog.Logger
	renewed prometheus.Counter
	refused prometheus.Counter
}

// NewRenewer checks cfg and builds a Renewer.
func NewRenewer(cfg RenewerConfig) (*Renewer, error) {
	if cfg.EdgeNodes == nil {
		return nil, errors.New("renewer: EdgeNodes is required")
	}
	if cfg.Issuer == nil || cfg.Issuer.CA == nil {
		return nil, errors.New("renewer: an Issuer with a CA is required")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	r := &Renewer{
		cfg:    cfg,
		logger: cfg.Logger.With("component", "renew"),
		renewed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_cert_renewed_total",
			Help: "Node certificates renewed over a live session.",
		}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_cert_renew_refused_total",
			Help: "Certificate renewals refused: unknown or disabled node, superseded certificate, bad request.",
		}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{r.renewed, r.refused} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("renewer: register metrics: %w", err)
			}
		}
	}
	return r, nil
}

// Renew issues node a new certificate for the key in csrPEM, provided
// currentSerial (hex, as tunnel.Identity.Serial) is the serial of the
// certificate on record for an allowed node, and records the new one as
// current. Refusals wrap ErrRefused; other errors are the API server's.
func (r *Renewer) Renew(ctx context.Context, node, currentSerial string, csrPEM []byte) (*x509.Certificate, error) {
	cert, err := r.renew(ctx, node, currentSerial, csrPEM)
	if err != nil {
		if errors.Is(err, ErrRefused) {
			r.refused.Inc()
			r.logger.Warn("renewal refused", "node", node, "serial", currentSerial, "reason", err)
		}
		return nil, err
	}
	r.renewed.Inc()
	r.logger.Info("certificate renewed", "node", node, "old_serial", currentSerial,
		"serial", cert.SerialNumber.Text(16), "not_after", cert.NotAfter)
	return cert, nil
}

func (r *Renewer) renew(ctx context.Context, node, currentSerial string, csrPEM []byte) (*x509.Certificate, error) {
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: renew node %s: %w", ErrRefused, node, err)
	}
	check := func(e *edgenode.EdgeNode) error {
		if err := e.CertificateCurrent(currentSerial, r.cfg.Now()); err != nil {
			return fmt.Errorf("%w: renew: %w", ErrRefused, err)
		}
		return nil
	}
	e, err := r.cfg.EdgeNodes.Get(ctx, node)
	if err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("%w: renew: node %q is not on the whitelist", ErrRefused, node)
		}
		return nil, fmt.Errorf("renew node %s: read EdgeNode: %w", node, err)
	}
	if err := check(e); err != nil {
		return nil, err
	}
	cert, err := r.cfg.Issuer.sign(csr, node)
	if err != nil {
		return nil, fmt.Errorf("renew node %s: %w", node, err)
	}
	// Written over the version that was checked; a conflict re-checks, so
	// of two renewals of one certificate only one is recorded.
	if err := recordCertificate(ctx, r.cfg.EdgeNodes, e, node, cert, check); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("%w: renew: node %q was removed from the whitelist", ErrRefused, node)
		}
		return nil, fmt.Errorf("renew node %s: %w", node, err)
	}
	return cert, nil
}
