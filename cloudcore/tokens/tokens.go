// Package tokens issues service-account tokens for the pods of edge nodes,
// as the API server issues them to a kubelet, after the checks Kubernetes'
// NodeRestriction admission makes of a kubelet's TokenRequest: the pod
// exists, is bound to the node that asks, has the UID and the service
// account the node names, and the token is bound to that pod. The pod is
// read from the catalog's informer cache (no GET per request).
//
// It writes nothing but TokenRequests and keeps no token: the answer goes
// to the edge, which stores it. It must never log a token.
package tokens

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/ratelog"
)

// Pods are the pods each edge node holds, from a cache (the catalog):
// Get returns the pod named by key only if it is bound to node now.
type Pods interface {
	Get(node string, key objsync.Key) (catalog.Object, bool)
}

// Config configures an Issuer. Zero values mean the defaults beside each
// field.
type Config struct {
	// MinExpirationSeconds is the shortest lifetime asked of the API
	// server; shorter requests are raised to it, as kubelet's are (the API
	// server refuses less than 10 minutes). Default 600.
	MinExpirationSeconds int64
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives the issuer's metrics. Nil registers them nowhere.
	Registerer prometheus.Registerer
}

// DefaultMinExpirationSeconds is Config.MinExpirationSeconds' default.
const DefaultMinExpirationSeconds = 600

// defaultProjectionSeconds is what the API server defaults a projection's
// expirationSeconds to (the ServiceAccount admission plugin writes 3607
// into the volume it injects).
const defaultProjectionSeconds = 3600

// Issuer answers the token requests of edge nodes. It is safe for
// concurrent use by the sessions of many nodes.
type Issuer struct {
	client  kubernetes.Interface
	pods    Pods
	cfg     Config
	logger  *slog.Logger
	lim     *ratelog.Limiter
	results *prometheus.CounterVec
	refused *prometheus.CounterVec
}

// New returns an issuer that reads pods from pods and asks client for
// tokens. Metrics are registered with cfg.Registerer; a registration
// error is returned.
func New(client kubernetes.Interface, pods Pods, cfg Config) (*Issuer, error) {
	if client == nil || pods == nil {
		return nil, errors.New("tokens: a client and a pod cache are required")
	}
	if cfg.MinExpirationSeconds <= 0 {
		cfg.MinExpirationSeconds = DefaultMinExpirationSeconds
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	i := &Issuer{
		client: client, pods: pods, cfg: cfg,
		logger: cfg.Logger.With("component", "tokens"),
		lim:    ratelog.New(0, nil),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_token_requests_total",
			Help: "Service-account token requests from edges, by result: issued, refused (the node may not have it), rejected (the API server refused it), error (transient, the edge asks again).",
		}, []string{"result"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_token_refused_total",
			Help: "Token requests refused before reaching the API server, by reason: bad_request, not_bound, uid_mismatch, service_account_mismatch, not_projected.",
		}, []string{"reason"}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{i.results, i.refused} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register token metrics: %w", err)
			}
		}
	}
	return i, nil
}

// Reasons a request is refused, the values of tether_token_refused_total's
// reason label.
const (
	ReasonBadRequest     = "bad_request"              // the payload or resource does not decode or validate
	ReasonNotBound       = "not_bound"                // no such pod bound to the node
	ReasonUIDMismatch    = "uid_mismatch"             // the pod of that name has another uid
	ReasonServiceAccount = "service_account_mismatch" // the pod runs as another service account
	ReasonNotProjected   = "not_projected"            // no serviceAccountToken projection of the pod asks for this
)

// refusal is a request the node may not make: it wraps
// dispatch.ErrForbidden.
type refusal struct {
	reason string
	err    error
}

func (r *refusal) Error() string   { return dispatch.ErrForbidden.Error() + ": " + r.err.Error() }
func (r *refusal) Unwrap() []error { return []error{dispatch.ErrForbidden, r.err} }

func refuse(reason, format string, args ...any) error {
	return &refusal{reason: reason, err: fmt.Errorf(format, args...)}
}

// Token answers the token request m from node: the payload of the answer
// (a message.Token), or an error. A request the node may not make wraps
// dispatch.ErrForbidden and never reaches the API server; one the API
// server refuses for good (no such service account, invalid) wraps
// dispatch.ErrRejected; any other error is transient. Refusals are
// counted by reason and logged once per node and reason per minute.
func (i *Issuer) Token(ctx context.Context, node string, m *message.Message) ([]byte, error) {
	payload, err := i.token(ctx, node, m)
	var r *refusal
	switch {
	case err == nil:
		i.results.WithLabelValues("issued").Inc()
	case errors.As(err, &r):
		i.results.WithLabelValues("refused").Inc()
		i.refused.WithLabelValues(r.reason).Inc()
		if ok, suppressed := i.lim.Allow(node + "\x00" + r.reason); ok {
			i.logger.Warn("token request refused", "node", node, "reason", r.reason, "namespace", m.Resource.Namespace,
				"service_account", m.Resource.Name, "err", r.err, "suppressed", suppressed)
		}
	case errors.Is(err, dispatch.ErrRejected):
		i.results.WithLabelValues("rejected").Inc()
	default:
		i.results.WithLabelValues("error").Inc()
	}
	return payload, err
}

func (i *Issuer) token(ctx context.Context, node string, m *message.Message) ([]byte, error) {
	ns, sa := m.Resource.Namespace, m.Resource.Name
	if !message.IsTokenRequest(m) || ns == "" || sa == "" {
		return nil, refuse(ReasonBadRequest, "node %q: a token request names a service account and its namespace", node)
	}
	var req message.TokenRequest
	if err := message.NewCodec(0).UnmarshalValue(m.Payload, &req); err != nil {
		return nil, refuse(ReasonBadRequest, "node %q: token request payload: %v", node, err)
	}
	if err := req.Validate(); err != nil {
		return nil, refuse(ReasonBadRequest, "node %q: %v", node, err)
	}
	pod, err := i.boundPod(node, ns, req.Pod)
	if err != nil {
		return nil, err
	}
	if string(pod.UID) != req.PodUID {
		return nil, refuse(ReasonUIDMismatch, "node %q: pod %s/%s has uid %s, not %s", node, ns, req.Pod, pod.UID, req.PodUID)
	}
	if pod.Spec.ServiceAccountName != sa {
		return nil, refuse(ReasonServiceAccount, "node %q: pod %s/%s runs as service account %q, not %q",
			node, ns, req.Pod, pod.Spec.ServiceAccountName, sa)
	}
	maxSeconds, ok := projectedSeconds(pod, req.Audiences)
	if !ok {
		return nil, refuse(ReasonNotProjected, "node %q: no serviceAccountToken projection of pod %s/%s has audiences %q",
			node, ns, req.Pod, req.Audiences)
	}
	seconds := i.clamp(req.ExpirationSeconds)
	if seconds > i.clamp(maxSeconds) {
		return nil, refuse(ReasonNotProjected, "node %q: pod %s/%s projects tokens of at most %d s, not %d s",
			node, ns, req.Pod, maxSeconds, req.ExpirationSeconds)
	}
	tr, err := i.client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         req.Audiences,
			ExpirationSeconds: &seconds,
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, apiError(fmt.Sprintf("create token of %s/%s for pod %s (uid %s)", ns, sa, req.Pod, req.PodUID), err)
	}
	granted := seconds
	if tr.Spec.ExpirationSeconds != nil && *tr.Spec.ExpirationSeconds > 0 {
		granted = *tr.Spec.ExpirationSeconds
	}
	answer := message.Token{Token: tr.Status.Token, ExpiresUnix: tr.Status.ExpirationTimestamp.Unix(), ExpirationSeconds: granted}
	if err := answer.Validate(); err != nil {
		return nil, fmt.Errorf("token of %s/%s from the API server: %w", ns, sa, err)
	}
	payload, err := message.NewCodec(0).Append(nil, &answer)
	if err != nil {
		return nil, fmt.Errorf("encode token: %w", err)
	}
	i.logger.Debug("token issued", "node", node, "namespace", ns, "service_account", sa, "pod", req.Pod, "expires", answer.ExpiresUnix)
	return payload, nil
}

// boundPod returns the cached pod ns/name if it is bound to node.
func (i *Issuer) boundPod(node, ns, name string) (*corev1.Pod, error) {
	o, ok := i.pods.Get(node, objsync.Key{Kind: "Pod", Namespace: ns, Name: name})
	if !ok {
		return nil, refuse(ReasonNotBound, "node %q: pod %s/%s is not bound to it", node, ns, name)
	}
	var pod corev1.Pod
	if err := json.Unmarshal(o.Data, &pod); err != nil {
		return nil, fmt.Errorf("decode cached pod %s/%s: %w", ns, name, err)
	}
	return &pod, nil
}

// projectedSeconds returns the longest lifetime a serviceAccountToken
// projection of pod with exactly these audiences asks for (none: the API
// server's own, the projection's empty audience), and whether there is
// one. Newer API servers restrict a node to these audiences too
// (ServiceAccountNodeAudienceRestriction); checking here refuses early
// and the same way on every version.
func projectedSeconds(pod *corev1.Pod, audiences []string) (int64, bool) {
	var best int64
	found := false
	for _, v := range pod.Spec.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, s := range v.Projected.Sources {
			t := s.ServiceAccountToken
			if t == nil {
				continue
			}
			want := []string{}
			if t.Audience != "" {
				want = []string{t.Audience}
			}
			if !slices.Equal(want, append([]string{}, audiences...)) {
				continue
			}
			secs := int64(defaultProjectionSeconds)
			if t.ExpirationSeconds != nil {
				secs = *t.ExpirationSeconds
			}
			best, found = max(best, secs), true
		}
	}
	return best, found
}

// clamp raises a lifetime to the minimum and bounds it by the API
// server's maximum.
func (i *Issuer) clamp(seconds int64) int64 {
	return min(max(seconds, i.cfg.MinExpirationSeconds), message.MaxTokenExpirationSeconds)
}

// apiError classifies an API error per the dispatcher's contract: no such
// service account or pod, an invalid request or a forbidden one (RBAC, the
// API server's own NodeRestriction) is rejected for good; anything else
// (5xx, 429, timeouts) is transient.
func apiError(what string, err error) error {
	err = fmt.Errorf("%s: %w", what, err)
	switch {
	case apierrors.IsNotFound(err), apierrors.IsInvalid(err), apierrors.IsBadRequest(err), apierrors.IsForbidden(err):
		return fmt.Errorf("%w: %w", dispatch.ErrRejected, err)
	}
	return err
}
