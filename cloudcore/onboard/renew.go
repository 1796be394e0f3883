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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/cloudcore/edgenode"
)

// RenewerConfig configures a Renewer.
type RenewerConfig struct {
	// EdgeNodes is the whitelist. Required.
	EdgeNodes *edgenode.Client
	// Issuer signs the new certificates. Required.
	Issuer *Issuer
	// Grace is how long, at most, the certificate a renewal replaces stays
	// accepted, in case the node never received the new one (a lost reply,
	// a crash before it was stored); it ends earlier when that certificate
	// expires or the node connects with the new one. Zero means
	// DefaultRenewGrace.
	Grace time.Duration
	// Now is the clock for the current certificate's expiry. Nil means
	// time.Now.
	Now func() time.Time
	// Logger receives the renewals' logs. Nil discards them.
	Logger *slog.Logger
	// Registerer receives the renewal metrics. Nil registers them nowhere.
	Registerer prometheus.Registerer
}

// DefaultRenewGrace is RenewerConfig.Grace's default.
const DefaultRenewGrace = 24 * time.Hour

// Renewer renews the certificate of a node over its live session: the
// session's certificate vouches for the node, so no token is needed, but
// only the node's current certificate (or the previous one, within its
// grace) may be renewed, and only while the node is allowed. The new
// certificate becomes the current one; the one it replaces stays accepted
// as the previous one until the node connects with the new one, for at
// most Grace and never past its own expiry, so that a renewal whose reply
// is lost does not lock the node out.
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
	if cfg.Grace == 0 {
		cfg.Grace = DefaultRenewGrace
	}
	if cfg.Grace < 0 {
		return nil, fmt.Errorf("renewer: negative grace %s", cfg.Grace)
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
// currentSerial (hex, as tunnel.Identity.Serial) is the serial of a
// certificate the whitelist accepts for an allowed node (the current one,
// or the previous one within its grace), and records the new one as
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
	e, err := r.cfg.EdgeNodes.Get(ctx, node)
	if err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("%w: renew: node %q is not on the whitelist", ErrRefused, node)
		}
		return nil, fmt.Errorf("renew node %s: read EdgeNode: %w", node, err)
	}
	if _, err := e.Accepts(currentSerial, r.cfg.Now()); err != nil {
		return nil, fmt.Errorf("%w: renew: %w", ErrRefused, err)
	}
	cert, err := r.cfg.Issuer.sign(csr, node)
	if err != nil {
		return nil, fmt.Errorf("renew node %s: %w", node, err)
	}
	// Written over the version that was checked; a conflict re-checks.
	if err := recordCertificate(ctx, r.cfg.EdgeNodes, e, node, r.replace(currentSerial, cert)); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("%w: renew: node %q was removed from the whitelist", ErrRefused, node)
		}
		return nil, fmt.Errorf("renew node %s: %w", node, err)
	}
	return cert, nil
}

// replace makes cert current in place of the certificate with serial. When
// that was the current one, it becomes the previous one, accepted until
// the earlier of its expiry and now plus the grace. When it was already
// the previous one (the node never got the certificate it was issued
// last), the previous one stays as it was, grace included: retries do not
// extend it, and the certificate that was never delivered is dropped.
func (r *Renewer) replace(serial string, cert *x509.Certificate) func(*edgenode.EdgeNode) error {
	return func(e *edgenode.EdgeNode) error {
		now := r.cfg.Now()
		if _, err := e.Accepts(serial, now); err != nil {
			return fmt.Errorf("%w: renew: %w", ErrRefused, err)
		}
		if cur := e.Status.Certificate; cur.Serial == serial {
			until := cur.NotAfter.Time
			if g := now.Add(r.cfg.Grace); g.Before(until) {
				until = g
			}
			e.Status.Previous = &edgenode.Certificate{Serial: serial, NotAfter: metav1.NewTime(until)}
		}
		e.Status.Certificate = certRecord(cert)
		return nil
	}
}
