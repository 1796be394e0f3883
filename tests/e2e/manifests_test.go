package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/yaml"

	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/tests/controlplane"
)

// repoPath is a path of the repository from this package's directory.
func repoPath(rel string) string { return filepath.Join("..", "..", filepath.FromSlash(rel)) }

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// TestManifestsOnAPIServer applies everything in build/ a user applies,
// as docs/operations.md ("Install on real hosts") lists it and in that
// order, with server-side apply and strict field validation, to a fresh
// real kube-apiserver with a real kube-controller-manager (its
// Deployment, ReplicaSet and disruption controllers; no scheduler, no
// kubelet), and checks what a real cluster does with them up to
// scheduling: every object is accepted (an unknown field is refused, as
// the control shows), the CRDs become Established, the Deployment
// controller makes one ReplicaSet and it three Pods with the manifest's
// container (arguments, ports, probes), ServiceAccount and security
// context, Pending only for want of a scheduler (no failure condition),
// the Service gets a ClusterIP with its UDP and TCP ports and node ports,
// and the PodDisruptionBudget's status is computed over the three pods.
// Then the real cloudcore binary runs with the Deployment's arguments (the
// listen addresses moved to free loopback ports: this machine is shared),
// as the manifest's user and group, with a token of the manifest's
// ServiceAccount: it starts, creates the CA Secret, takes the VM
// controller's Lease, is ready on /readyz, and stops on SIGTERM within
// the pod's grace period, logging no error.
func TestManifestsOnAPIServer(t *testing.T) {
	env := controlplane.Start(t, controlplane.WithControllerManager(controlplane.ControllerManager{
		Controllers: []string{"deployment-controller", "replicaset-controller", "disruption-controller"},
	}))
	ctx := context.Background()
	cs := adminClient(t, env.Config)
	dyn, err := dynamic.NewForConfig(env.Config)
	require.NoError(t, err)
	files := installOrder(t)
	require.Equal(t, []string{
		"build/crds/edgenode.yaml", "build/crds/virtualmachine.yaml", "build/runtimeclass-vm.yaml",
		"build/deploy/namespace.yaml", "build/deploy/rbac.yaml",
		"build/deploy/deployment.yaml", "build/deploy/service.yaml", "build/deploy/pdb.yaml",
	}, files, "docs/operations.md installs every manifest a user applies, in this order")

	// The control plane installed build/crds for other tests; a user's
	// cluster has none of Tether's CRDs until they apply them.
	for _, f := range files[:2] {
		name := docsOf(t, f)[0].GetName()
		require.NoError(t, dyn.Resource(crdGVR).Delete(ctx, name, metav1.DeleteOptions{}))
		require.Eventually(t, func() bool {
			_, err := dyn.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
			return apierrors.IsNotFound(err)
		}, time.Minute, 100*time.Millisecond, "CRD %s is removed", name)
	}

	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(discovery.NewDiscoveryClientForConfigOrDie(env.Config)))
	apply := func(u *unstructured.Unstructured, dryRun bool) error {
		gvk := u.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return fmt.Errorf("map %s: %w", gvk, err)
		}
		body, err := u.MarshalJSON()
		if err != nil {
			return fmt.Errorf("encode %s %s: %w", gvk.Kind, u.GetName(), err)
		}
		opts := metav1.PatchOptions{FieldManager: "tether-manifests-test", FieldValidation: "Strict"}
		if dryRun {
			opts.DryRun = []string{metav1.DryRunAll}
		}
		var res dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if u.GetNamespace() != "" {
			res = dyn.Resource(m.Resource).Namespace(u.GetNamespace())
		}
		_, err = res.Patch(ctx, u.GetName(), types.ApplyPatchType, body, opts)
		return err
	}

	// The control: strict validation refuses a field the API does not
	// have, so that an accepted manifest has none.
	bad := docsOf(t, "build/deploy/deployment.yaml")[0]
	require.NoError(t, unstructured.SetNestedField(bad.Object, int64(3), "spec", "replica"))
	err = apply(bad, true)
	require.Error(t, err, "a Deployment with spec.replica is refused")
	require.Contains(t, err.Error(), ".spec.replica: field not declared in schema")

	var deployment appsv1.Deployment
	for _, f := range files {
		for _, u := range docsOf(t, f) {
			require.NoError(t, apply(u, false), "%s: %s %s is accepted", f, u.GetKind(), u.GetName())
			if u.GetKind() == "Deployment" {
				require.NoError(t, runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &deployment))
			}
		}
	}
	for _, f := range files[:2] {
		name := docsOf(t, f)[0].GetName()
		require.Eventually(t, func() bool {
			u, err := dyn.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
			return err == nil && crdCondition(u, "Established") && crdCondition(u, "NamesAccepted")
		}, time.Minute, 100*time.Millisecond, "CRD %s becomes Established", name)
	}
	rc, err := cs.NodeV1().RuntimeClasses().Get(ctx, "tether-vm", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, "tether-vm", rc.Handler)

	checkDeploymentPods(t, cs, &deployment)
	checkService(t, cs, deployment.Namespace)
	checkPDB(t, cs, deployment.Namespace)
	runCloudCoreAsDeployed(t, env, cs, &deployment)
}

// installOrder is the manifests the `kubectl apply` lines of
// docs/operations.md name, in their order, a directory standing for its
// manifests in name order (as kubectl reads it).
func installOrder(t *testing.T) []string {
	t.Helper()
	doc, err := os.ReadFile(repoPath("docs/operations.md"))
	require.NoError(t, err)
	_, install, ok := strings.Cut(string(doc), "## Install on real hosts")
	require.True(t, ok, "docs/operations.md has its install section")
	install, _, _ = strings.Cut(install, "\n## ")
	var out []string
	for _, m := range regexp.MustCompile(`-f (build/\S+)`).FindAllStringSubmatch(install, -1) {
		p := m[1]
		st, err := os.Stat(repoPath(p))
		require.NoError(t, err, "docs/operations.md names %s", p)
		if !st.IsDir() {
			out = append(out, p)
			continue
		}
		entries, err := os.ReadDir(repoPath(p))
		require.NoError(t, err)
		for _, e := range entries {
			if ext := filepath.Ext(e.Name()); ext == ".yaml" || ext == ".yml" || ext == ".json" {
				out = append(out, strings.TrimSuffix(p, "/")+"/"+e.Name())
			}
		}
	}
	return out
}

// docsOf reads the objects of a manifest file (documents of comments
// only are skipped).
func docsOf(t *testing.T, file string) []*unstructured.Unstructured {
	t.Helper()
	b, err := os.ReadFile(repoPath(file))
	require.NoError(t, err)
	dec := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var out []*unstructured.Unstructured
	for {
		doc, err := dec.Read()
		if errors.Is(err, io.EOF) {
			return out
		}
		require.NoError(t, err, file)
		js, err := yaml.YAMLToJSON(doc)
		require.NoError(t, err, file)
		if string(bytes.TrimSpace(js)) == "null" {
			continue
		}
		u := &unstructured.Unstructured{}
		require.NoError(t, u.UnmarshalJSON(js), file)
		out = append(out, u)
	}
}

// crdCondition says whether a CRD's condition of type is True.
func crdCondition(u *unstructured.Unstructured, typ string) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == typ && m["status"] == "True" {
			return true
		}
	}
	return false
}

// checkDeploymentPods waits for the Deployment controller's ReplicaSet
// and its Pods, and checks that they carry the manifest's pod spec and
// wait only for a scheduler.
func checkDeploymentPods(t *testing.T, cs kubernetes.Interface, manifest *appsv1.Deployment) {
	t.Helper()
	ctx := context.Background()
	ns := manifest.Namespace
	served, err := cs.AppsV1().Deployments(ns).Get(ctx, manifest.Name, metav1.GetOptions{})
	require.NoError(t, err)
	want := *manifest.Spec.Replicas
	var rs appsv1.ReplicaSet
	require.Eventually(t, func() bool {
		l, err := cs.AppsV1().ReplicaSets(ns).List(ctx, metav1.ListOptions{})
		if err != nil || len(l.Items) != 1 {
			return false
		}
		rs = l.Items[0]
		return metav1.IsControlledBy(&rs, served) && rs.Status.Replicas == want
	}, 2*time.Minute, 100*time.Millisecond, "the Deployment controller creates one ReplicaSet, and it %d pods", want)
	var pods []corev1.Pod
	require.Eventually(t, func() bool {
		l, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false
		}
		pods = l.Items
		return len(pods) == int(want)
	}, 2*time.Minute, 100*time.Millisecond, "the ReplicaSet controller creates %d pods", want)

	tmpl := served.Spec.Template.Spec // the manifest's, defaulted by the API server
	mc := manifest.Spec.Template.Spec.Containers[0]
	require.Len(t, tmpl.Containers, 1)
	require.Equal(t, mc.Args, tmpl.Containers[0].Args)
	require.Equal(t, mc.Ports, tmpl.Containers[0].Ports)
	require.Equal(t, mc.ReadinessProbe.HTTPGet.Path, tmpl.Containers[0].ReadinessProbe.HTTPGet.Path)
	require.Equal(t, mc.LivenessProbe.HTTPGet.Path, tmpl.Containers[0].LivenessProbe.HTTPGet.Path)
	for _, p := range pods {
		require.True(t, metav1.IsControlledBy(&p, &rs), "pod %s belongs to the ReplicaSet", p.Name)
		require.Equal(t, manifest.Spec.Template.Spec.ServiceAccountName, p.Spec.ServiceAccountName)
		require.Equal(t, tmpl.Containers, p.Spec.Containers, "pod %s runs the manifest's container: image, args, ports, probes, resources, security context", p.Name)
		require.Equal(t, tmpl.SecurityContext, p.Spec.SecurityContext)
		require.Equal(t, tmpl.Affinity, p.Spec.Affinity)
		require.Equal(t, tmpl.TerminationGracePeriodSeconds, p.Spec.TerminationGracePeriodSeconds)
		for k, v := range manifest.Spec.Template.Labels {
			require.Equal(t, v, p.Labels[k], "pod %s has the template's label %s", p.Name, k)
		}
		// Pending for want of a scheduler: not bound, and nothing said it
		// cannot be (a scheduler would add PodScheduled).
		require.Equal(t, corev1.PodPending, p.Status.Phase)
		require.Empty(t, p.Spec.NodeName)
		require.Empty(t, p.Status.Conditions, "pod %s: no scheduler or kubelet has looked at it", p.Name)
	}
	// Neither the ReplicaSet nor the Deployment reports a failure (a pod
	// the API server refused, a quota).
	require.Eventually(t, func() bool {
		d, err := cs.AppsV1().Deployments(ns).Get(ctx, manifest.Name, metav1.GetOptions{})
		if err != nil || d.Status.ObservedGeneration != d.Generation || d.Status.Replicas != want {
			return false
		}
		progressing := false
		for _, c := range d.Status.Conditions {
			if c.Type == appsv1.DeploymentReplicaFailure {
				t.Fatalf("Deployment reports %s: %s", c.Reason, c.Message)
			}
			progressing = progressing || (c.Type == appsv1.DeploymentProgressing && c.Status == corev1.ConditionTrue)
		}
		return progressing && d.Status.ReadyReplicas == 0
	}, 2*time.Minute, 100*time.Millisecond, "the Deployment is progressing, with no replica ready (none scheduled)")
	cur, err := cs.AppsV1().ReplicaSets(ns).Get(ctx, rs.Name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Empty(t, cur.Status.Conditions, "the ReplicaSet reports no failure")
}

// checkService checks the Service the API server made of service.yaml.
func checkService(t *testing.T, cs kubernetes.Interface, ns string) {
	t.Helper()
	svc, err := cs.CoreV1().Services(ns).Get(context.Background(), "tether-cloudcore", metav1.GetOptions{})
	require.NoError(t, err)
	require.NotEmpty(t, svc.Spec.ClusterIP)
	require.NotEqual(t, corev1.ClusterIPNone, svc.Spec.ClusterIP)
	type port struct {
		name, target string
		proto        corev1.Protocol
		port         int32
	}
	var got []port
	for _, p := range svc.Spec.Ports {
		got = append(got, port{p.Name, p.TargetPort.String(), p.Protocol, p.Port})
		require.NotZero(t, p.NodePort, "a LoadBalancer Service's port %s gets a node port", p.Name)
	}
	require.Equal(t, []port{
		{"quic", "quic", corev1.ProtocolUDP, 10000},
		{"websocket", "websocket", corev1.ProtocolTCP, 10000},
		{"join", "join", corev1.ProtocolTCP, 10002},
	}, got)
	require.Equal(t, corev1.ServiceExternalTrafficPolicyLocal, svc.Spec.ExternalTrafficPolicy)
	require.NotZero(t, svc.Spec.HealthCheckNodePort, "externalTrafficPolicy Local gets a health check node port")
}

// checkPDB waits for the disruption controller's status of pdb.yaml's
// budget: it counts the Deployment's three pods, none healthy.
func checkPDB(t *testing.T, cs kubernetes.Interface, ns string) {
	t.Helper()
	var pdb *policyv1.PodDisruptionBudget
	require.Eventually(t, func() bool {
		var err error
		pdb, err = cs.PolicyV1().PodDisruptionBudgets(ns).Get(context.Background(), "tether-cloudcore", metav1.GetOptions{})
		return err == nil && pdb.Status.ObservedGeneration == pdb.Generation && pdb.Status.ExpectedPods == 3
	}, 2*time.Minute, 100*time.Millisecond, "the disruption controller computes the budget over the Deployment's pods")
	require.Equal(t, int32(2), pdb.Status.DesiredHealthy)
	require.Equal(t, int32(0), pdb.Status.CurrentHealthy)
	require.Equal(t, int32(0), pdb.Status.DisruptionsAllowed)
	i := slices.IndexFunc(pdb.Status.Conditions, func(c metav1.Condition) bool { return c.Type == policyv1.DisruptionAllowedCondition })
	require.GreaterOrEqual(t, i, 0, "the budget has its DisruptionAllowed condition")
	require.Equal(t, metav1.ConditionFalse, pdb.Status.Conditions[i].Status)
	require.Equal(t, policyv1.InsufficientPodsReason, pdb.Status.Conditions[i].Reason)
}

// listenAddrFlags are the Deployment's arguments that bind ports; the
// test moves them to free loopback ports.
var listenAddrFlags = []string{"--quic-addr", "--websocket-addr", "--join-addr", "--metrics-addr"}

// runCloudCoreAsDeployed runs the cloudcore binary with d's arguments as
// its pod would, under its ServiceAccount's token and its user and group.
func runCloudCoreAsDeployed(t *testing.T, env *controlplane.Env, cs kubernetes.Interface, d *appsv1.Deployment) {
	t.Helper()
	ctx := context.Background()
	pod := d.Spec.Template.Spec
	c := pod.Containers[0]
	// A directory the pod's user may read: the binary and its kubeconfig.
	dir, err := os.MkdirTemp("", "tether-manifests-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	bin := filepath.Join(dir, "cloudcore")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/tetheredge/tether/cloudcore/cmd/cloudcore").CombinedOutput()
	require.NoError(t, err, "go build cloudcore: %s", out)

	tok, err := cs.CoreV1().ServiceAccounts(d.Namespace).CreateToken(ctx, pod.ServiceAccountName,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: new(int64(3600))}}, metav1.CreateOptions{})
	require.NoError(t, err)
	kc := clientcmdapi.NewConfig()
	kc.Clusters["test"] = &clientcmdapi.Cluster{Server: env.Config.Host, CertificateAuthorityData: env.Config.CAData}
	kc.AuthInfos["sa"] = &clientcmdapi.AuthInfo{Token: tok.Status.Token}
	kc.Contexts["sa"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "sa"}
	kc.CurrentContext = "sa"
	kubeconfig := filepath.Join(dir, "kubeconfig")
	require.NoError(t, clientcmd.WriteToFile(*kc, kubeconfig))

	sc := pod.SecurityContext
	require.NotNil(t, sc.RunAsUser)
	require.NotNil(t, sc.RunAsGroup)
	require.NoError(t, os.Chown(kubeconfig, int(*sc.RunAsUser), int(*sc.RunAsGroup)))

	var args []string
	moved := 0
	for _, a := range c.Args {
		flag, _, _ := strings.Cut(a, "=")
		if slices.Contains(listenAddrFlags, flag) {
			a, moved = flag+"=127.0.0.1:0", moved+1
		}
		args = append(args, a)
	}
	require.Equal(t, len(listenAddrFlags), moved, "the Deployment sets every listen address")
	args = append(args, "--kubeconfig="+kubeconfig)
	cmd := exec.Command(bin, args...)
	cmd.Dir = "/"
	cmd.Env = []string{"HOME=/nonexistent", "PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(*sc.RunAsUser), Gid: uint32(*sc.RunAsGroup)}}
	logs := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	require.NoError(t, cmd.Start(), "start cloudcore as uid %d: the test runs as root, as make test does", *sc.RunAsUser)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = cmd.Process.Kill()
			<-exited
		}
		t.Logf("cloudcore's log:\n%s", logs.String())
	})

	metricsAddr := regexp.MustCompile(`msg="cloudcore listening".* metrics_addr=(\S+)`)
	var addr string
	require.Eventually(t, func() bool {
		select {
		case err := <-exited:
			stopped = true
			t.Fatalf("cloudcore exited with the Deployment's arguments: %v\n%s", err, logs.String())
		default:
		}
		m := metricsAddr.FindStringSubmatch(logs.String())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	}, 2*time.Minute, 100*time.Millisecond, "cloudcore logs where it listens")
	probe := c.ReadinessProbe.HTTPGet.Path
	hc := &http.Client{Timeout: 5 * time.Second}
	require.Eventually(t, func() bool {
		resp, err := hc.Get("http://" + addr + probe)
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 2*time.Minute, 100*time.Millisecond, "cloudcore answers its readiness probe %s", probe)
	resp, err := hc.Get("http://" + addr + c.LivenessProbe.HTTPGet.Path)
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "its liveness probe")

	caNS := argValue(t, c.Args, "--ca-namespace")
	secret, err := cs.CoreV1().Secrets(caNS).Get(ctx, onboard.DefaultCAName, metav1.GetOptions{})
	require.NoError(t, err, "cloudcore created the CA Secret in %s", caNS)
	require.Equal(t, corev1.SecretTypeTLS, secret.Type)
	require.Eventually(t, func() bool {
		l, err := cs.CoordinationV1().Leases(caNS).Get(ctx, "tether-vm-controller", metav1.GetOptions{})
		return err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity != ""
	}, 2*time.Minute, 100*time.Millisecond, "the VM controller takes its leader Lease")

	// The kubelet's stop: SIGTERM, then SIGKILL after the grace period.
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
	select {
	case err := <-exited:
		stopped = true
		require.NoError(t, err, "cloudcore exits cleanly on SIGTERM")
	case <-time.After(grace):
		t.Fatalf("cloudcore did not stop within the pod's grace period of %s after SIGTERM", grace)
	}
	for _, line := range strings.Split(logs.String(), "\n") {
		require.NotContains(t, line, "level=ERROR", "cloudcore logged an error")
		require.NotContains(t, strings.ToLower(line), "forbidden", "cloudcore was refused something")
	}
}

// argValue is the value of --flag=value among args.
func argValue(t *testing.T, args []string, flag string) string {
	t.Helper()
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, flag+"="); ok {
			return v
		}
	}
	t.Fatalf("no %s among %q", flag, args)
	return ""
}

// lockedBuffer is a bytes.Buffer a process writes while the test reads.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
