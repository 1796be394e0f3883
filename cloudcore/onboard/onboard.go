// Package onboard lets only whitelisted edge nodes into a Tether cluster.
// It keeps the cluster CA in a Kubernetes Secret (EnsureCA), signs node
// client certificates from certificate requests whose subject it never
// trusts (Issuer), serves the join endpoint that trades a one-time join
// token for a certificate (Service), renews a connected node's certificate
// (Renewer), and gives the operator the whitelist's verbs (Allow, List,
// Disable, Remove).
//
// The EdgeNode object is the single source of truth: a token is usable only
// while its hash is in the node's spec, using it removes it with an
// optimistic-concurrency update, and the status names the certificate
// serial the tunnel accepts (and, for a bounded grace after a renewal, the
// one it replaced). A refused join or renewal changes nothing.
//
// It must not decide whether a live session may continue (that is the
// whitelist's job, from its cache) and it never stores a token's secret.
package onboard

import (
	"errors"
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// ErrRefused is wrapped by every refusal of a renewal: the node is unknown
// or disabled, the presented certificate is not its current one, or the
// certificate request is unacceptable.
var ErrRefused = errors.New("onboard: refused")

// ErrBadCSR is wrapped by every rejection of a certificate request.
var ErrBadCSR = errors.New("onboard: bad certificate request")

// validateNodeName checks that name can be an EdgeNode's (and a Node's)
// name: a DNS-1123 subdomain.
func validateNodeName(name string) error {
	if name == "" {
		return errors.New("node name is empty")
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return fmt.Errorf("node name %q is invalid: %s", name, strings.Join(errs, "; "))
	}
	return nil
}
