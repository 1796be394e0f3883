// Package certs keeps the edge node's client certificate current: it holds
// the certificate the tunnel presents, and renews it over the live session
// at 80% of its lifetime with a fresh private key that never leaves the
// node. It does not talk to the network itself; the session's renewal
// call is injected.
package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"sync"
	"time"

	edgejoin "github.com/tetheredge/tether/edgecore/join"
)

// Holder hands the current certificate to TLS handshakes.
type Holder struct {
	mu   sync.RWMutex
	cert *tls.Certificate
}

// NewHolder holds cert.
func NewHolder(cert tls.Certificate) *Holder { return &Holder{cert: &cert} }

// Set replaces the certificate; new handshakes use it.
func (h *Holder) Set(cert tls.Certificate) {
	h.mu.Lock()
	h.cert = &cert
	h.mu.Unlock()
}

// Leaf returns the current certificate, parsed.
func (h *Holder) Leaf() *x509.Certificate {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.cert.Leaf
}

// GetClientCertificate is for tls.Config.
func (h *Holder) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.cert, nil
}

// RenewFunc sends a PEM certificate request to the cloud over the live
// session and returns the PEM certificate it answers.
type RenewFunc func(ctx context.Context, csrPEM []byte) ([]byte, error)

// Rotator renews the held certificate when it is due.
type Rotator struct {
	dir    string
	node   string
	ca     *x509.Certificate
	holder *Holder
	renew  RenewFunc
	logger *slog.Logger
	now    func() time.Time

	onRenewed func()
}

// NewRotator returns a rotator for the identity stored in dir (see
// edgecore/join's Store: the renewed key and certificate replace the old
// pair in one atomic step). now may be nil (time.Now), logger too (logs
// are discarded).
func NewRotator(dir, node string, ca *x509.Certificate, holder *Holder, renew RenewFunc, logger *slog.Logger, now func() time.Time) *Rotator {
	if now == nil {
		now = time.Now
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Rotator{dir: dir, node: node, ca: ca, holder: holder, renew: renew, logger: logger.With("component", "certs"), now: now}
}

// OnRenewed sets f to be called after every renewal that was stored and
// installed (EdgeCore reconnects with the new certificate then). Call it
// before Run.
func (r *Rotator) OnRenewed(f func()) { r.onRenewed = f }

// Run renews the certificate at 80% of each lifetime until ctx ends. A
// failed renewal (offline, refused) is retried after a delay that shrinks
// as the expiry nears.
func (r *Rotator) Run(ctx context.Context) error {
	for {
		leaf := r.holder.Leaf()
		wait := edgejoin.RenewAt(leaf).Sub(r.now())
		if wait > 0 {
			r.logger.Info("certificate renewal scheduled", "serial", leaf.SerialNumber.Text(16), "at", r.now().Add(wait))
			if !sleep(ctx, wait) {
				return nil
			}
		}
		if err := r.RenewOnce(ctx); err != nil {
			retry := min(30*time.Second, max(time.Second, leaf.NotAfter.Sub(r.now())/10))
			r.logger.Warn("certificate renewal failed", "err", err, "retry_in", retry)
			if !sleep(ctx, retry) {
				return nil
			}
		}
	}
}

// RenewOnce makes a new key, has the cloud sign it, checks the answer and
// stores it, then presents it on new connections. When the answer is lost
// or cannot be stored, the held certificate stays: the cloud keeps
// accepting it for a grace period, and the next attempt renews it again.
func (r *Rotator) RenewOnce(ctx context.Context) error {
	key, csr, err := edgejoin.NewRenewalKey()
	if err != nil {
		return err
	}
	certPEM, err := r.renew(ctx, csr)
	if err != nil {
		return err
	}
	cert, err := edgejoin.ValidateIssued(certPEM, r.ca, r.node, key.Public())
	if err != nil {
		return fmt.Errorf("check renewed certificate: %w", err)
	}
	if err := edgejoin.Store(r.dir, key, cert, r.ca); err != nil {
		return err
	}
	r.holder.Set(tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert})
	r.logger.Info("certificate renewed", "serial", cert.SerialNumber.Text(16), "not_after", cert.NotAfter)
	if r.onRenewed != nil {
		r.onRenewed()
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
