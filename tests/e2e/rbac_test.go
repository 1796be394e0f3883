package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/tetheredge/tether/cloudcore/autonomy"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/cloudcore/vm"
	"github.com/tetheredge/tether/common/message"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/testlog"
)

// The ServiceAccount build/deploy/rbac.yaml binds CloudCore's roles to.
const (
	cloudSANamespace = "tether-system"
	cloudSAName      = "tether-cloudcore"
)

// TestRBACLeastPrivilege runs CloudCore (cloudcore/app) under exactly the
// permissions of build/deploy/rbac.yaml, with a token of its
// ServiceAccount, against a fresh real kube-apiserver with RBAC on, and
// walks everything CloudCore does to the API: it creates the cluster CA,
// lists and watches, an edge joins with a token (EdgeNode update and
// status), registers its Node (one the operator created before, without
// the edge label) and writes its Lease, pods, ConfigMaps and
// Secrets sync to it, a pod's service-account token is issued, the VM
// controller (behind its leader election Lease)
// gives VirtualMachines pods, mirrors a pod's status into a VM's, deletes
// a deleted VM's pod and reports a name conflict, the edge renews its
// certificate over the session, goes offline (CloudCore renews its Lease
// and taints and conditions its Node, on the autonomy leader Lease),
// queues pod status and a pod's
// finished deletion, comes back with new operator labels (a Node update),
// and CloudCore releases the leader Lease when it stops.
//
// It fails on any request the API server refuses (every response is
// watched, so a refusal a component only retries is seen too), on any
// log line of CloudCore's that says "forbidden", and on any rule of
// rbac.yaml (verb, resource, resource name) that no request needed: the
// roles grant what CloudCore uses and nothing more.
func TestRBACLeastPrivilege(t *testing.T) {
	// Its own control plane: a fresh cluster, in which CloudCore creates
	// the CA Secret itself.
	env := controlplane.Start(t)
	cs := adminClient(t, env.Config)
	ctx := context.Background()
	roles := applyManifests(t, cs, deployPath("namespace.yaml"), deployPath("rbac.yaml"))
	ensureRuntimeClass(t, cs)
	ns := env.Namespace(t)
	dyn, err := dynamic.NewForConfig(env.Config)
	require.NoError(t, err)
	vms := vm.NewClient(dyn)

	tok, err := cs.CoreV1().ServiceAccounts(cloudSANamespace).CreateToken(ctx, cloudSAName,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: new(int64(3600))}}, metav1.CreateOptions{})
	require.NoError(t, err)
	sa := rest.AnonymousClientConfig(env.Config)
	sa.BearerToken = tok.Status.Token
	// The control: RBAC is on and the token is the ServiceAccount's, so
	// what the roles do not grant is refused.
	saClient, err := kubernetes.NewForConfig(sa)
	require.NoError(t, err)
	_, err = saClient.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	require.True(t, apierrors.IsForbidden(err), "CloudCore's ServiceAccount may not list namespaces: %v", err)
	err = saClient.CoreV1().Nodes().Delete(ctx, "any", metav1.DeleteOptions{})
	require.True(t, apierrors.IsForbidden(err), "CloudCore's ServiceAccount may not delete Nodes: %v", err)
	audit := &apiAudit{}
	sa.Wrap(audit.wrap)
	logs := newForbiddenLogs(testlog.New().Handler())
	// step fails the test at once, naming the step, if CloudCore was
	// refused anything so far: a refusal usually shows as a timeout later.
	step := func(name string) {
		t.Helper()
		if bad := audit.refused(); len(bad) > 0 {
			t.Fatalf("%s: the API server refused CloudCore: %s", name, strings.Join(bad, "; "))
		}
		if bad := logs.lines(); len(bad) > 0 {
			t.Fatalf("%s: CloudCore logged forbidden: %s", name, strings.Join(bad, "; "))
		}
		t.Logf("step done: %s", name)
	}
	// eventually waits for cond, and fails at once, naming the requests,
	// if the API server refuses CloudCore anything meanwhile.
	eventually := func(cond func() bool, wait time.Duration, msg string) {
		t.Helper()
		require.Eventually(t, func() bool { return len(audit.refused()) > 0 || cond() }, wait, 50*time.Millisecond, msg)
		if bad := audit.refused(); len(bad) > 0 {
			t.Fatalf("waiting until %s: the API server refused CloudCore: %s", msg, strings.Join(bad, "; "))
		}
	}

	c := startCloud(t, env.Config, cloudOptions{
		kubernetes: sa, logger: slog.New(logs), vms: true, rebalance: true, timings: testTimings,
		certValidity: 12 * time.Second, offlineAutonomy: time.Hour,
	})
	step("start: CA created, informers synced")
	secret, err := cs.CoreV1().Secrets(onboard.DefaultCANamespace).Get(ctx, onboard.DefaultCAName, metav1.GetOptions{})
	require.NoError(t, err, "CloudCore created the CA Secret")
	require.Equal(t, corev1.SecretTypeTLS, secret.Type)

	// Join with a token (the admin whitelists the node), connect, register.
	const node = "edge-rbac"
	tk, _, err := onboard.Allow(ctx, c.nodes, c.app.CA().Cert, node, onboard.AllowOptions{Labels: map[string]string{"site": "rbac-1"}})
	require.NoError(t, err)
	dir := dataDir(t, node)
	joined, err := edgejoin.Join(ctx, edgejoin.Config{Cloud: c.app.JoinAddr().String(), Token: tk.String(), Node: node, Dir: dir})
	require.NoError(t, err)
	step("join")
	// The operator created the Node before the edge first connected,
	// without the edge label: the edge's registration finds it, and
	// upstream reads it (get: the catalog caches only edge Nodes) and
	// brings it up to date.
	nodes := cs.CoreV1().Nodes()
	_, err = nodes.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = nodes.Delete(context.Background(), node, metav1.DeleteOptions{}) })
	edgeOpts := edgeOptions{timings: testTimings, nodeStatus: nodestatus.Config{LeaseDuration: 4 * time.Second, Now: time.Now}}
	e := startEdge(t, storedIdentity(t, c, node, dir), dir, c.addr, edgeOpts)
	eventually(func() bool {
		n, err := nodes.Get(ctx, node, metav1.GetOptions{})
		cond := conditionOf(n, autonomy.ConditionType)
		return err == nil && n.Labels["site"] == "rbac-1" && readyOf(n) == corev1.ConditionTrue &&
			cond != nil && cond.Status == corev1.ConditionTrue
	}, time.Minute, "the edge registers its Node, Ready, and CloudCore marks it connected")
	leases := cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	eventually(func() bool {
		l, err := leases.Get(ctx, node, metav1.GetOptions{})
		return err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == node
	}, 30*time.Second, "the edge's Lease is written")
	step("connect: Node registered, Lease written, connected condition")

	// Sync: a pod bound to the edge, with a ConfigMap and a Secret.
	_, err = cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "rbac-cm"}, Data: map[string]string{"k": "v"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = cs.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "rbac-secret"}, StringData: map[string]string{"k": "v"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	pod := podFor(ns, "rbac-pod", node, "rbac-cm")
	pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: "s", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "rbac-secret"}}})
	_, err = cs.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	require.NoError(t, err)
	waitConverged(t, c.cat, e.st, node, 4) // Node, pod, ConfigMap, Secret
	step("sync")

	// A service-account token for a pod of the edge, asked over the
	// session as the pod manager asks (no runtime in this test).
	_, err = cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "rbac-sa"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	tokenPod := podFor(ns, "rbac-token-pod", node)
	tokenPod.Spec.ServiceAccountName = "rbac-sa"
	tokenPod.Spec.Volumes = []corev1.Volume{apiAccessVolume("kube-api-access-rbac")}
	tokenPod, err = cs.CoreV1().Pods(ns).Create(ctx, tokenPod, metav1.CreateOptions{})
	require.NoError(t, err)
	waitConverged(t, c.cat, e.st, node, 5)
	issued, err := e.app.Syncer().RequestToken(ctx, ns, "rbac-sa", message.TokenRequest{Pod: tokenPod.Name, PodUID: string(tokenPod.UID), ExpirationSeconds: 3607})
	require.NoError(t, err)
	review, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: issued.Token}}, metav1.CreateOptions{})
	require.NoError(t, err)
	require.True(t, review.Status.Authenticated, "the token CloudCore got for the edge's pod: %s", review.Status.Error)
	step("service-account token")

	// VMs: two get their pods; a third finds its pod's name taken.
	for _, name := range []string{"vm-status", "vm-deleted", "vm-taken"} {
		if name == "vm-taken" {
			taken := podFor(ns, vm.PodName(name), "", "")
			taken.Spec.Volumes = nil
			_, err := cs.CoreV1().Pods(ns).Create(ctx, taken, metav1.CreateOptions{})
			require.NoError(t, err)
		}
		_, err := vms.Create(ctx, &vm.VirtualMachine{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec:       vm.Spec{Image: "tether-guest", VCPUs: 1, Memory: "128Mi", NodeName: node},
		})
		require.NoError(t, err)
	}
	waitVM := func(name string, ok func(*vm.VirtualMachine) bool, msg string) {
		t.Helper()
		eventually(func() bool {
			v, err := vms.Get(context.Background(), ns, name)
			return err == nil && ok(v)
		}, time.Minute, msg)
	}
	for _, name := range []string{"vm-status", "vm-deleted"} {
		waitVM(name, func(v *vm.VirtualMachine) bool {
			return v.Status.Phase == vm.PhaseScheduled && v.Status.PodName == vm.PodName(name)
		}, "the VM gets its pod and a status")
	}
	waitVM("vm-taken", func(v *vm.VirtualMachine) bool { return v.Status.Reason == vm.ReasonPodConflict }, "a taken pod name is a conflict")
	deletedPod, err := cs.CoreV1().Pods(ns).Get(ctx, vm.PodName("vm-deleted"), metav1.GetOptions{})
	require.NoError(t, err)
	require.NoError(t, vms.Delete(ctx, ns, "vm-deleted"))
	eventually(func() bool {
		p, err := cs.CoreV1().Pods(ns).Get(context.Background(), deletedPod.Name, metav1.GetOptions{})
		return err == nil && p.DeletionTimestamp != nil
	}, time.Minute, "the VM controller deletes a deleted VM's pod (it waits for the edge)")
	step("vm controller")

	// Renewal over the session at 80 % of the 12 s lifetime.
	eventually(func() bool {
		return e.app.Certificate().SerialNumber.Text(16) != joined.Serial
	}, time.Minute, "the edge renews its certificate")
	eventually(func() bool {
		en, err := c.nodes.Get(context.Background(), node)
		return err == nil && en.Status.Certificate != nil && en.Status.Certificate.Serial == e.app.Certificate().SerialNumber.Text(16) &&
			en.Status.Previous == nil && connected(c, node)
	}, time.Minute, "the renewed edge reconnects")
	step("renewal")

	// Offline: CloudCore renews the Lease, conditions and taints the Node.
	e.stop()
	renewals := c.counter(t, "tether_autonomy_lease_renewals_total", nil)
	eventually(func() bool {
		n, err := nodes.Get(context.Background(), node, metav1.GetOptions{})
		cond := conditionOf(n, autonomy.ConditionType)
		return err == nil && cond != nil && cond.Status == corev1.ConditionFalse &&
			slices.ContainsFunc(n.Spec.Taints, func(tt corev1.Taint) bool { return tt.MatchTaint(&autonomy.TaintOffline) }) &&
			c.poll("tether_autonomy_lease_renewals_total", nil) > renewals
	}, time.Minute, "CloudCore stands in for the offline edge")
	step("offline autonomy")

	// Queued at the edge while offline: the sync pod's status, the status
	// of one VM's pod, the finished deletion of the deleted VM's pod. The
	// operator relabels the node meanwhile.
	publishOffline(t, storePath(dir),
		podStatusItem(t, ns, "rbac-pod", corev1.PodRunning),
		podStatusItem(t, ns, vm.PodName("vm-status"), corev1.PodFailed),
		store.OutboxItem{Op: message.OpDelete, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: ns, Name: deletedPod.Name, UID: string(deletedPod.UID)}},
	)
	en, err := c.nodes.Get(ctx, node)
	require.NoError(t, err)
	en.Spec.Labels = map[string]string{"site": "rbac-2"}
	_, err = c.nodes.Update(ctx, en)
	require.NoError(t, err)
	e = startEdge(t, storedIdentity(t, c, node, dir), dir, c.addr, edgeOpts)
	eventually(func() bool {
		p, err := cs.CoreV1().Pods(ns).Get(context.Background(), "rbac-pod", metav1.GetOptions{})
		return err == nil && p.Status.Phase == corev1.PodRunning
	}, time.Minute, "the queued pod status is written")
	eventually(func() bool {
		_, err := cs.CoreV1().Pods(ns).Get(context.Background(), deletedPod.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}, time.Minute, "the edge finishes the VM pod's deletion")
	waitVM("vm-status", func(v *vm.VirtualMachine) bool { return v.Status.Phase == vm.PhaseFailed }, "the VM's status follows its pod's")
	eventually(func() bool {
		n, err := nodes.Get(context.Background(), node, metav1.GetOptions{})
		cond := conditionOf(n, autonomy.ConditionType)
		return err == nil && n.Labels["site"] == "rbac-2" && cond != nil && cond.Status == corev1.ConditionTrue &&
			!slices.ContainsFunc(n.Spec.Taints, func(tt corev1.Taint) bool { return tt.MatchTaint(&autonomy.TaintOffline) })
	}, time.Minute, "back online: the Node is relabelled, connected and untainted")
	step("reconnect: queued writes, Node update")

	// A stopped CloudCore releases the VM controller's Lease.
	e.stop()
	c.stop()
	eventually(func() bool {
		l, err := cs.CoordinationV1().Leases(onboard.DefaultCANamespace).Get(context.Background(), vm.DefaultLeaseName, metav1.GetOptions{})
		return err == nil && (l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity == "")
	}, 30*time.Second, "the stopped CloudCore releases the Lease")
	step("stop")

	if unused := roles.unused(audit.allowed()); len(unused) > 0 {
		t.Fatalf("rules of rbac.yaml that CloudCore never needed (remove them, or make the test exercise them): %s", strings.Join(unused, "; "))
	}
}

// deployPath is a manifest of build/deploy.
func deployPath(name string) string { return filepath.Join("..", "..", "build", "deploy", name) }

// storedIdentity is the identity `edgecore join` (and renewals since)
// stored in dir.
func storedIdentity(t *testing.T, c *cloud, node, dir string) identity {
	t.Helper()
	pair, _, leaf, err := edgejoin.Load(dir)
	require.NoError(t, err)
	pair.Leaf = leaf
	key, ok := pair.PrivateKey.(crypto.Signer)
	require.True(t, ok)
	return identity{node: node, cert: pair, key: key, ca: c.app.CA().Cert}
}

// applyManifests creates every object of the manifests with the admin
// client, as `kubectl apply` would on a fresh cluster, and returns their
// RBAC rules.
func applyManifests(t *testing.T, cs kubernetes.Interface, paths ...string) *policy {
	t.Helper()
	ctx := context.Background()
	p := &policy{}
	for _, path := range paths {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		dec := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
		for {
			doc, err := dec.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			require.NoError(t, err)
			var meta metav1.TypeMeta
			require.NoError(t, yaml.Unmarshal(doc, &meta))
			if meta.Kind == "" {
				continue // only comments
			}
			strict := func(into any) { require.NoError(t, yaml.UnmarshalStrict(doc, into), "%s: %s", path, meta.Kind) }
			switch meta.Kind {
			case "Namespace":
				var o corev1.Namespace
				strict(&o)
				_, err = cs.CoreV1().Namespaces().Create(ctx, &o, metav1.CreateOptions{})
			case "ServiceAccount":
				var o corev1.ServiceAccount
				strict(&o)
				_, err = cs.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, &o, metav1.CreateOptions{})
			case "ClusterRole":
				var o rbacv1.ClusterRole
				strict(&o)
				p.roles = append(p.roles, role{name: "ClusterRole " + o.Name, rules: o.Rules})
				_, err = cs.RbacV1().ClusterRoles().Create(ctx, &o, metav1.CreateOptions{})
			case "ClusterRoleBinding":
				var o rbacv1.ClusterRoleBinding
				strict(&o)
				_, err = cs.RbacV1().ClusterRoleBindings().Create(ctx, &o, metav1.CreateOptions{})
			case "Role":
				var o rbacv1.Role
				strict(&o)
				p.roles = append(p.roles, role{name: "Role " + o.Namespace + "/" + o.Name, namespace: o.Namespace, rules: o.Rules})
				_, err = cs.RbacV1().Roles(o.Namespace).Create(ctx, &o, metav1.CreateOptions{})
			case "RoleBinding":
				var o rbacv1.RoleBinding
				strict(&o)
				_, err = cs.RbacV1().RoleBindings(o.Namespace).Create(ctx, &o, metav1.CreateOptions{})
			default:
				t.Fatalf("%s: unexpected kind %s", path, meta.Kind)
			}
			require.NoError(t, err, "%s: create %s", path, meta.Kind)
		}
	}
	require.NotEmpty(t, p.roles, "the manifests hold CloudCore's roles")
	return p
}

// apiRequest is what RBAC authorises of one request: its verb, API group,
// resource (with "/subresource"), namespace and name.
type apiRequest struct {
	verb, group, resource, namespace, name string
	// initial is a watch that streams the current state first
	// (sendInitialEvents=true): how client-go's informers list.
	initial bool
}

func (r apiRequest) String() string {
	s := r.verb + " " + r.resource
	if r.group != "" {
		s += "." + r.group
	}
	if r.namespace != "" {
		s += " in " + r.namespace
	}
	if r.name != "" {
		s += " named " + r.name
	}
	return s
}

// requestOf parses r's URL as kube-apiserver's request info resolver does;
// false for a non-resource URL (discovery, /version).
func requestOf(r *http.Request) (apiRequest, bool) {
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	var a apiRequest
	switch {
	case len(parts) >= 3 && parts[0] == "api":
		parts = parts[2:]
	case len(parts) >= 4 && parts[0] == "apis":
		a.group, parts = parts[1], parts[3:]
	default:
		return a, false
	}
	q := r.URL.Query()
	watch := q.Get("watch") == "true" || q.Get("watch") == "1"
	if parts[0] == "watch" {
		watch, parts = true, parts[1:]
	}
	a.initial = watch && q.Get("sendInitialEvents") == "true"
	if len(parts) >= 2 && parts[0] == "namespaces" {
		// A namespace's own name is its namespace too (its status and
		// finalize subresources aside, which CloudCore never calls).
		a.namespace = parts[1]
		if len(parts) >= 3 {
			parts = parts[2:]
		}
	}
	a.resource = parts[0]
	if len(parts) >= 2 {
		a.name = parts[1]
	}
	if len(parts) >= 3 {
		a.resource += "/" + parts[2]
	}
	switch r.Method {
	case http.MethodGet:
		switch {
		case watch:
			a.verb = "watch"
		case a.name != "":
			a.verb = "get"
		default:
			a.verb = "list"
		}
	case http.MethodPost:
		a.verb = "create"
	case http.MethodPut:
		a.verb = "update"
	case http.MethodPatch:
		a.verb = "patch"
	case http.MethodDelete:
		a.verb = "delete"
		if a.name == "" {
			a.verb = "deletecollection"
		}
	default:
		a.verb = strings.ToLower(r.Method)
	}
	return a, true
}

// apiAudit records every API request CloudCore makes with the status of
// its answer.
type apiAudit struct {
	mu   sync.Mutex
	seen []auditEntry
}

type auditEntry struct {
	req  apiRequest
	code int
	url  string
}

func (a *apiAudit) wrap(next http.RoundTripper) http.RoundTripper {
	return auditTransport{a: a, next: next}
}

type auditTransport struct {
	a    *apiAudit
	next http.RoundTripper
}

func (t auditTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(r)
	if req, ok := requestOf(r); ok && err == nil {
		t.a.mu.Lock()
		t.a.seen = append(t.a.seen, auditEntry{req: req, code: resp.StatusCode, url: r.Method + " " + r.URL.RequestURI()})
		t.a.mu.Unlock()
	}
	return resp, err
}

// refused returns the requests answered 403 Forbidden.
func (a *apiAudit) refused() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, e := range a.seen {
		if e.code == http.StatusForbidden {
			out = append(out, fmt.Sprintf("%s (%s)", e.req, e.url))
		}
	}
	return out
}

// allowed returns the requests RBAC let through (any answer but 403).
func (a *apiAudit) allowed() []apiRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []apiRequest
	for _, e := range a.seen {
		if e.code != http.StatusForbidden {
			out = append(out, e.req)
		}
	}
	return out
}

// policy is the roles of rbac.yaml.
type policy struct{ roles []role }

type role struct {
	name      string
	namespace string // "" for a ClusterRole
	rules     []rbacv1.PolicyRule
}

// unused returns each permission (verb, resource, resource name) of the
// roles that no request in reqs needed. A list counts as needed when an
// informer streamed the resource's initial state through a watch instead
// (client-go's WatchListClient, on by default): client-go falls back to a
// LIST when the API server cannot stream, so informers need both verbs.
func (p *policy) unused(reqs []apiRequest) []string {
	var out []string
	for _, r := range p.roles {
		for _, rule := range r.rules {
			names := rule.ResourceNames
			if len(names) == 0 {
				names = []string{""}
			}
			for _, g := range rule.APIGroups {
				for _, res := range rule.Resources {
					for _, verb := range rule.Verbs {
						for _, name := range names {
							used := slices.ContainsFunc(reqs, func(q apiRequest) bool {
								v := q.verb
								if q.initial && verb == "list" {
									v = "list"
								}
								return q.group == g && q.resource == res && v == verb &&
									(name == "" || q.name == name) && (r.namespace == "" || q.namespace == r.namespace)
							})
							if !used {
								out = append(out, fmt.Sprintf("%s: %s %s.%s %s", r.name, verb, res, g, name))
							}
						}
					}
				}
			}
		}
	}
	return out
}

// forbiddenLogs is a slog.Handler that records every log record that says
// "forbidden" (in its message or any attribute) and passes all on.
type forbiddenLogs struct {
	next  slog.Handler
	attrs string // the attributes of With, formatted
	mu    *sync.Mutex
	seen  *[]string
}

func newForbiddenLogs(next slog.Handler) *forbiddenLogs {
	return &forbiddenLogs{next: next, mu: &sync.Mutex{}, seen: new([]string)}
}

func (h *forbiddenLogs) Enabled(context.Context, slog.Level) bool { return true }

func (h *forbiddenLogs) Handle(ctx context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	b.WriteString(h.attrs)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	if line := b.String(); strings.Contains(strings.ToLower(line), "forbidden") {
		h.mu.Lock()
		*h.seen = append(*h.seen, line)
		h.mu.Unlock()
	}
	if h.next.Enabled(ctx, r.Level) {
		return h.next.Handle(ctx, r)
	}
	return nil
}

func (h *forbiddenLogs) WithAttrs(attrs []slog.Attr) slog.Handler {
	c := *h
	for _, a := range attrs {
		c.attrs += fmt.Sprintf(" %s=%v", a.Key, a.Value)
	}
	c.next = h.next.WithAttrs(attrs)
	return &c
}

func (h *forbiddenLogs) WithGroup(name string) slog.Handler {
	c := *h
	c.next = h.next.WithGroup(name)
	return &c
}

func (h *forbiddenLogs) lines() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(*h.seen)
}
