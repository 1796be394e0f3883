package pods

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/clock"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/edgecore/store"
)

// Service-account tokens for serviceAccountToken projections, as kubelet's
// token manager keeps them (pkg/kubelet/token): one token per pod and
// projection, bound to the pod, asked of the cloud (which asks the API
// server) and kept in the store, so that a pod (re)started while the cloud
// is unreachable gets the token it had while it is valid. A token is
// refreshed once 80 % of its lifetime or 24 h has passed, whichever comes
// first; while a refresh fails the valid token is kept. A pod with no
// valid token waits (reason TokenUnavailable) and is looked at again.
// Tokens are secrets: they are never logged.

// TokenRequester asks the cloud for a service-account token (the syncer's
// RequestToken); any error means none now.
type TokenRequester interface {
	RequestToken(ctx context.Context, namespace, serviceAccount string, req message.TokenRequest) (message.Token, error)
}

// TokenStore keeps the tokens across restarts (*store.Store).
type TokenStore interface {
	PodToken(ctx context.Context, podUID, key string) (store.PodToken, bool, error)
	SavePodToken(ctx context.Context, t store.PodToken) error
	DeletePodTokens(ctx context.Context, podUID string) error
	PodTokenUIDs(ctx context.Context) ([]string, error)
}

const (
	// tokenMaxTTL is the longest a token is used before it is refreshed
	// (kubelet's maxTTL).
	tokenMaxTTL = 24 * time.Hour
	// tokenRequestTimeout bounds one request to the cloud; the pod's
	// sync waits for it.
	tokenRequestTimeout = 30 * time.Second
	// tokenRetry is how soon a failed refresh of a still valid token is
	// tried again.
	tokenRetry = 30 * time.Second
	// defaultTokenSeconds is the API server's default of a projection's
	// expirationSeconds.
	defaultTokenSeconds = 3600
	// reasonTokenUnavailable is the waiting reason of containers whose
	// pod has no valid token yet.
	reasonTokenUnavailable = "TokenUnavailable"
)

// errNoTokens refuses serviceAccountToken sources when the manager has
// no TokenRequester.
var errNoTokens = errors.New("serviceAccountToken sources need a token requester (EdgeCore wires the cloud's)")

// tokenError is a projection's missing token: the pod's containers wait
// with reason TokenUnavailable.
type tokenError struct{ err error }

func (e *tokenError) Error() string { return e.err.Error() }
func (e *tokenError) Unwrap() error { return e.err }

// tokenRefreshAt is when a token issued at iat and expiring at exp is to
// be replaced: at 80 % of its lifetime, or 24 h after iat if sooner.
func tokenRefreshAt(iat, exp time.Time) time.Time {
	at := exp.Add(-exp.Sub(iat) / 5)
	return minTime(at, iat.Add(tokenMaxTTL))
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// tokens hands out the projections' tokens: from memory, from the store
// after a restart, or from the cloud when none is current.
type tokens struct {
	req    TokenRequester
	st     TokenStore
	clock  clock.PassiveClock
	logger *slog.Logger
	lim    *ratelog.Limiter
	result *prometheus.CounterVec

	mu sync.Mutex
	// held is what the store holds, by pod UID and key, read once.
	held map[[2]string]store.PodToken
}

func newTokens(req TokenRequester, st TokenStore, c clock.PassiveClock, logger *slog.Logger, lim *ratelog.Limiter) *tokens {
	return &tokens{
		req: req, st: st, clock: c, logger: logger, lim: lim,
		result: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "tether", Subsystem: "pods", Name: "token_requests_total",
			Help: "Service-account token requests to the cloud, by result: issued, failed (offline, refused or to retry: the reason is logged).",
		}, []string{"result"}),
		held: make(map[[2]string]store.PodToken),
	}
}

// describe is what a projection asks for, stored beside its token so
// that a token asked for otherwise is never served for it.
func describe(serviceAccount string, req message.TokenRequest) string {
	return serviceAccount + "\x00" + strings.Join(req.Audiences, ",") + "\x00" + strconv.FormatInt(req.ExpirationSeconds, 10)
}

// token returns the token of projection src of volume vol of pod, and when
// to look again (its refresh, or a retry). Without a valid token it
// returns a *tokenError.
func (t *tokens) token(ctx context.Context, pod *corev1.Pod, vol string, src *corev1.ServiceAccountTokenProjection) (string, time.Time, error) {
	if t == nil {
		return "", time.Time{}, &tokenError{errNoTokens}
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		return "", time.Time{}, &tokenError{errors.New("the pod names no serviceAccountName")}
	}
	req := message.TokenRequest{Pod: pod.Name, PodUID: string(pod.UID), ExpirationSeconds: defaultTokenSeconds}
	if src.Audience != "" {
		req.Audiences = []string{src.Audience}
	}
	if src.ExpirationSeconds != nil {
		req.ExpirationSeconds = *src.ExpirationSeconds
	}
	id := [2]string{string(pod.UID), vol + "/" + src.Path}
	want := describe(sa, req)
	cur, ok, err := t.load(ctx, id)
	if err != nil {
		return "", time.Time{}, &tokenError{err}
	}
	now := t.clock.Now()
	valid := ok && cur.Request == want && now.Before(cur.ExpiresAt)
	if valid && now.Before(tokenRefreshAt(cur.IssuedAt, cur.ExpiresAt)) {
		return cur.Token, tokenRefreshAt(cur.IssuedAt, cur.ExpiresAt), nil
	}
	rctx, cancel := context.WithTimeout(ctx, tokenRequestTimeout)
	tok, err := t.req.RequestToken(rctx, pod.Namespace, sa, req)
	cancel()
	t.result.WithLabelValues(tokenResult(err)).Inc()
	if err != nil {
		if ok, suppressed := t.lim.Allow("token " + id[0] + " " + id[1]); ok {
			t.logger.Info("service-account token not refreshed", "pod", pod.Namespace+"/"+pod.Name, "projection", id[1],
				"service_account", sa, "have_valid", valid, "error", err, "suppressed", suppressed)
		}
		if valid {
			return cur.Token, minTime(now.Add(tokenRetry), cur.ExpiresAt), nil
		}
		return "", time.Time{}, &tokenError{fmt.Errorf("no valid service-account token for %s and none from the cloud: %w", id[1], err)}
	}
	exp := time.Unix(tok.ExpiresUnix, 0)
	next := store.PodToken{PodUID: id[0], Key: id[1], Request: want, Token: tok.Token,
		IssuedAt: exp.Add(-time.Duration(tok.ExpirationSeconds) * time.Second), ExpiresAt: exp}
	if !next.ExpiresAt.After(now) {
		return "", time.Time{}, &tokenError{fmt.Errorf("the cloud's token for %s expired at %s (this node's clock says %s)",
			id[1], exp.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))}
	}
	if next.IssuedAt.After(now) {
		// The cloud's clock is ahead: count the lifetime from now.
		next.IssuedAt = now
	}
	if err := t.st.SavePodToken(ctx, next); err != nil {
		// Served from memory all the same; a restart asks again.
		if ok, suppressed := t.lim.Allow("save token " + id[0]); ok {
			t.logger.Warn("service-account token not stored", "pod", pod.Namespace+"/"+pod.Name, "projection", id[1], "error", err, "suppressed", suppressed)
		}
	}
	t.mu.Lock()
	t.held[id] = next
	t.mu.Unlock()
	return next.Token, tokenRefreshAt(next.IssuedAt, next.ExpiresAt), nil
}

func tokenResult(err error) string {
	if err != nil {
		return "failed"
	}
	return "issued"
}

// load returns the token held for id, reading the store the first time.
func (t *tokens) load(ctx context.Context, id [2]string) (store.PodToken, bool, error) {
	t.mu.Lock()
	cur, ok := t.held[id]
	t.mu.Unlock()
	if ok {
		return cur, true, nil
	}
	cur, ok, err := t.st.PodToken(ctx, id[0], id[1])
	if err != nil || !ok {
		return store.PodToken{}, false, err
	}
	t.mu.Lock()
	t.held[id] = cur
	t.mu.Unlock()
	return cur, true, nil
}

// drop removes the tokens of pod uid, in memory and in the store.
func (t *tokens) drop(ctx context.Context, uid string) error {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	for id := range t.held {
		if id[0] == uid {
			delete(t.held, id)
		}
	}
	t.mu.Unlock()
	return t.st.DeletePodTokens(ctx, uid)
}

// prune removes the tokens of every pod not in keep (the stored pods'
// UIDs): pods deleted while EdgeCore was down, or whose sandbox never
// came back.
func (t *tokens) prune(ctx context.Context, keep map[string]bool) error {
	if t == nil {
		return nil
	}
	uids, err := t.st.PodTokenUIDs(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, uid := range uids {
		if !keep[uid] {
			errs = append(errs, t.drop(ctx, uid))
		}
	}
	return errors.Join(errs...)
}
