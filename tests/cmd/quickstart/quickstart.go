package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/tetheredge/tether/build/guest"
	"github.com/tetheredge/tether/build/images"
	cloudvm "github.com/tetheredge/tether/cloudcore/vm"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/controlplane"
)

// Config is what the quickstart runs. Every field is set by main from its
// flags; there are no hidden defaults here.
type Config struct {
	// Root is the repository root: build/ and _output/ are under it.
	Root string
	// Dir holds this run's kubeconfig, logs/, the edge's data directory
	// and the VMs' run directory (vm/); containerd's directory is
	// tests/containerd's, in /tmp. It is emptied of a previous run's state
	// at start.
	Dir string
	// Bin holds cloudcore and edgecore; Kubectl is the kubectl printed in
	// the next commands.
	Bin, Kubectl string
	// Node is the edge node's name.
	Node string
	// TunnelAddr is CloudCore's QUIC (UDP) and WebSocket (TCP) address,
	// JoinAddr its HTTPS join endpoint.
	TunnelAddr, JoinAddr string
	// CloudMetrics and EdgeMetrics are the daemons' --metrics-addr.
	CloudMetrics, EdgeMetrics string
	// ExitAfterReady stops everything once all is up instead of waiting
	// for Ctrl-C.
	ExitAfterReady bool
	// Out receives the progress lines.
	Out io.Writer
}

// The sample workloads, in the default namespace.
const (
	sampleNS  = "default"
	samplePod = "hello"
	sampleVM  = "hello-vm"
	// guestImage is the name the test guest is imported under in the
	// edge's VM image store.
	guestImage = "tether-guest"
	// guestDisk is the size of the guest's raw disk.
	guestDisk = 16 << 20
	// drainTimeout bounds the wait, at stop, for the edge to stop and
	// remove its pods and VMs after they were deleted.
	drainTimeout = 2 * time.Minute
)

// quickstart is one run. Each resource it starts is recorded so that stop
// undoes exactly what was started, in reverse order.
type quickstart struct {
	cfg   Config
	begin time.Time
	outMu sync.Mutex

	lock     *os.File
	logDir   string
	edgeDir  string
	vmRunDir string
	kubecfg  string
	cp       *controlplane.Env
	cs       kubernetes.Interface
	dyn      dynamic.Interface
	host     *containerd.Host
	stopHost func() error
	cloud    *daemon
	edge     *daemon
}

// say prints one progress line, stamped with the time since the start.
func (q *quickstart) say(format string, args ...any) {
	q.outMu.Lock()
	defer q.outMu.Unlock()
	fmt.Fprintf(q.cfg.Out, "[%6.1fs] %s\n", time.Since(q.begin).Seconds(), fmt.Sprintf(format, args...))
}

// step runs a long step between a line that says what it does and one
// that says how long it took.
func (q *quickstart) step(what string, f func() error) error {
	q.say("%s ...", what)
	t0 := time.Now()
	if err := f(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	q.say("    done in %s", time.Since(t0).Round(100*time.Millisecond))
	return nil
}

// run starts everything, creates the samples, prints the milestones, and
// waits for ctx to end (Ctrl-C) or, with ExitAfterReady, for everything to
// be up. It always stops what it started; the error joins the start's and
// the stop's.
func run(ctx context.Context, cfg Config) error {
	q := &quickstart{cfg: cfg, begin: time.Now()}
	err := q.start(ctx)
	if err == nil {
		err = q.samples(ctx)
	}
	if err == nil {
		q.printNext()
		if !cfg.ExitAfterReady {
			<-ctx.Done()
		}
	}
	if ctx.Err() != nil {
		q.say("interrupted: stopping (press Ctrl-C again to kill without cleaning up)")
	} else {
		q.say("stopping")
	}
	stopErr := q.stop()
	if stopErr == nil {
		q.say("stopped: nothing of the quickstart is left running or mounted")
	}
	if err != nil && ctx.Err() != nil {
		err = errStopped // interrupted while starting: the failures are its consequence
	}
	return errors.Join(err, stopErr)
}

// start brings the system up, in order: state directory, guest, control
// plane, containerd, CloudCore, the join, EdgeCore.
func (q *quickstart) start(ctx context.Context) error {
	if err := q.prepare(); err != nil {
		return err
	}
	var paths guest.Paths
	err := q.step("building the VM guest (kernel + busybox initramfs, cached in _output/guest)", func() error {
		var err error
		paths, err = guest.Build(guest.Config{CacheDir: filepath.Join(q.cfg.Root, "_output", "guest")})
		return err
	})
	if err != nil {
		return err
	}
	err = q.step("starting the control plane (etcd, kube-apiserver, kube-controller-manager from _output/testbin)", func() error {
		return q.startControlPlane(ctx)
	})
	if err != nil {
		return err
	}
	q.say("kubeconfig: %s", q.kubecfg)
	err = q.step("starting a private containerd (building and importing the pause and busybox images)", func() error {
		var err error
		q.host, q.stopHost, err = startHost(func(format string, args ...any) { q.say("    "+format, args...) })
		return err
	})
	if err != nil {
		return err
	}
	q.say(milestoneContainerd+" %s (its directory, snapshotter %s, log %s)", q.host.Dir, q.host.Snapshotter, q.host.LogPath())
	if err := q.startCloud(ctx); err != nil {
		return err
	}
	if err := q.join(ctx); err != nil {
		return err
	}
	if err := q.importGuest(ctx, paths); err != nil {
		return err
	}
	return q.startEdge()
}

// prepare makes the run's directories and clears a previous run's state:
// the control plane is new each time, so the edge joins again.
func (q *quickstart) prepare() error {
	if uid := os.Geteuid(); uid != 0 {
		return fmt.Errorf("the quickstart runs containerd and QEMU and needs root; running as uid %d (sudo make run)", uid)
	}
	for _, b := range []string{"cloudcore", "edgecore"} {
		if _, err := os.Stat(filepath.Join(q.cfg.Bin, b)); err != nil {
			return fmt.Errorf("find %s in %s (make build): %w", b, q.cfg.Bin, err)
		}
	}
	if _, err := os.Stat(q.cfg.Kubectl); err != nil {
		q.say("warning: %s is missing (make kubectl); the printed commands need it", q.cfg.Kubectl)
	}
	if err := os.MkdirAll(q.cfg.Dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", q.cfg.Dir, err)
	}
	lock, err := lockDir(q.cfg.Dir)
	if err != nil {
		return err
	}
	q.lock = lock
	q.logDir = filepath.Join(q.cfg.Dir, "logs")
	q.edgeDir = filepath.Join(q.cfg.Dir, q.cfg.Node)
	q.vmRunDir = filepath.Join(q.cfg.Dir, "vm")
	q.kubecfg = filepath.Join(q.cfg.Dir, "kubeconfig")
	// The lock is ours: whatever a previous run left is stale (a killed
	// quickstart's containerd host is reaped by tests/containerd when it
	// starts the new one).
	if err := sweep(q.vmRunDir, q.cfg.Dir); err != nil {
		q.say("cleaned up after a previous run: %v", err)
	}
	for _, d := range []string{q.edgeDir, q.vmRunDir, q.logDir} {
		if err := os.RemoveAll(d); err != nil {
			return fmt.Errorf("clear %s: %w", d, err)
		}
	}
	for _, d := range []string{q.logDir, q.vmRunDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	q.say("state and logs in %s", q.cfg.Dir)
	return nil
}

func (q *quickstart) startControlPlane(ctx context.Context) error {
	env, err := controlplane.New(controlplane.WithControllerManager(controlplane.DevControllerManager()))
	if err != nil {
		return err
	}
	q.cp = env
	if err := os.WriteFile(q.kubecfg, env.KubeConfig, 0o600); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	if q.cs, err = kubernetes.NewForConfig(env.Config); err != nil {
		return fmt.Errorf("build clientset: %w", err)
	}
	if q.dyn, err = dynamic.NewForConfig(env.Config); err != nil {
		return fmt.Errorf("build dynamic client: %w", err)
	}
	// tests/controlplane installed build/crds; the RuntimeClass is the
	// other manifest CloudCore's VM controller needs.
	b, err := os.ReadFile(filepath.Join(q.cfg.Root, "build", "runtimeclass-vm.yaml"))
	if err != nil {
		return fmt.Errorf("read the VM RuntimeClass: %w", err)
	}
	var rc nodev1.RuntimeClass
	if err := yaml.UnmarshalStrict(b, &rc); err != nil {
		return fmt.Errorf("decode the VM RuntimeClass: %w", err)
	}
	if _, err := q.cs.NodeV1().RuntimeClasses().Create(ctx, &rc, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create the VM RuntimeClass: %w", err)
	}
	return nil
}

func (q *quickstart) startCloud(ctx context.Context) error {
	var err error
	q.cloud, err = startDaemon(q.logDir, "cloudcore", filepath.Join(q.cfg.Bin, "cloudcore"),
		"--kubeconfig", q.kubecfg, "--quic-addr", q.cfg.TunnelAddr, "--websocket-addr", q.cfg.TunnelAddr,
		"--join-addr", q.cfg.JoinAddr, "--metrics-addr", q.cfg.CloudMetrics)
	if err != nil {
		return err
	}
	q.say("cloudcore started: tunnel %s (QUIC on UDP, WebSocket on TCP), join %s; log %s",
		q.cfg.TunnelAddr, q.cfg.JoinAddr, q.cloud.log)
	return nil
}

// join is the real whitelist flow: `cloudcore admin allow` makes the
// EdgeNode and a single-use token (once CloudCore has made the cluster
// CA), the token goes to a file only the owner reads, and `edgecore join
// --token-file` gets the node its certificate (and removes the file).
func (q *quickstart) join(ctx context.Context) error {
	cloudcore := filepath.Join(q.cfg.Bin, "cloudcore")
	var token string
	err := q.retry(ctx, time.Minute, func() error {
		out, err := runTool(ctx, nil, cloudcore, "admin", "allow", q.cfg.Node, "--kubeconfig", q.kubecfg)
		token = strings.TrimSpace(out)
		return err
	})
	if err != nil {
		return fmt.Errorf("whitelist %s: %w", q.cfg.Node, err)
	}
	q.say("cloudcore admin allow %s: EdgeNode created, single-use join token issued", q.cfg.Node)
	tokenFile := filepath.Join(q.cfg.Dir, q.cfg.Node+".token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		return fmt.Errorf("write the join token: %w", err)
	}
	// The token is single-use: join only once the endpoint listens.
	err = q.retry(ctx, time.Minute, func() error {
		c, err := net.DialTimeout("tcp", q.cfg.JoinAddr, time.Second)
		if err == nil {
			_ = c.Close()
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("reach the join endpoint %s: %w", q.cfg.JoinAddr, err)
	}
	_, err = runTool(ctx, nil, filepath.Join(q.cfg.Bin, "edgecore"), "join", "--cloud", q.cfg.JoinAddr,
		"--node", q.cfg.Node, "--token-file", tokenFile, "--data-dir", q.edgeDir, "--force")
	if err != nil {
		return err
	}
	q.say("edgecore join: %s has its certificate in %s (the token file is gone)", q.cfg.Node, q.edgeDir)
	return nil
}

// importGuest puts the guest into the edge's VM image store, as an
// operator would with `edgecore vm-image import`.
func (q *quickstart) importGuest(ctx context.Context, p guest.Paths) error {
	disk := filepath.Join(q.cfg.Dir, "guest-disk.raw")
	if err := os.WriteFile(disk, make([]byte, guestDisk), 0o600); err != nil {
		return fmt.Errorf("write the guest disk: %w", err)
	}
	defer os.Remove(disk)
	_, err := runTool(ctx, nil, filepath.Join(q.cfg.Bin, "edgecore"), "vm-image", "import", guestImage, disk,
		"--data-dir", q.edgeDir, "--kernel", p.Kernel, "--initrd", p.Initrd, "--cmdline", p.Cmdline)
	if err != nil {
		return err
	}
	q.say("edgecore vm-image import %s: the test guest is in the edge's image store", guestImage)
	return nil
}

func (q *quickstart) startEdge() error {
	var err error
	q.edge, err = startDaemon(q.logDir, "edgecore", filepath.Join(q.cfg.Bin, "edgecore"),
		"--cloud", q.cfg.TunnelAddr, "--node", q.cfg.Node, "--data-dir", q.edgeDir,
		"--cri-listen", filepath.Join(q.edgeDir, "cri.sock"), "--containerd", q.host.Endpoint(),
		"--vm", "--vm-run-dir", q.vmRunDir, "--metrics-addr", q.cfg.EdgeMetrics)
	if err != nil {
		return err
	}
	q.say("edgecore started: in-process CRI shim in front of the private containerd, VM backend on; log %s", q.edge.log)
	return nil
}

// retry calls f until it succeeds, ctx ends, a daemon exits, or limit
// passes.
func (q *quickstart) retry(ctx context.Context, limit time.Duration, f func() error) error {
	deadline := time.Now().Add(limit)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		err := f()
		if err == nil {
			return nil
		}
		if dErr := q.daemonsExited(); dErr != nil {
			return dErr
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return errors.Join(errStopped, err)
		case <-tick.C:
		}
	}
}

func (q *quickstart) daemonsExited() error {
	for _, d := range []*daemon{q.cloud, q.edge} {
		if d != nil {
			if err := d.exited(); err != nil {
				return err
			}
		}
	}
	return nil
}

// samples creates the sample pod and VM and prints, as they happen, the
// node turning Ready, the pod Running and the VM booted.
func (q *quickstart) samples(ctx context.Context) error {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: sampleNS, Name: samplePod},
		Spec: corev1.PodSpec{
			NodeName: q.cfg.Node,
			Containers: []corev1.Container{{
				Name: "hello", Image: images.BusyboxRef, ImagePullPolicy: corev1.PullNever,
				// It stops at once on SIGTERM, as a pid 1 shell would not.
				Command: []string{"sh", "-c", "echo hello from the edge; trap 'exit 0' TERM; while true; do sleep 1; done"},
			}},
		},
	}
	if _, err := q.cs.CoreV1().Pods(sampleNS).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create pod %s/%s: %w", sampleNS, samplePod, err)
	}
	q.say("created pod %s/%s (busybox) on %s", sampleNS, samplePod, q.cfg.Node)
	vms := cloudvm.NewClient(q.dyn)
	_, err := vms.Create(ctx, &cloudvm.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Namespace: sampleNS, Name: sampleVM},
		Spec:       cloudvm.Spec{Image: guestImage, VCPUs: 1, Memory: "128Mi", NodeName: q.cfg.Node},
	})
	if err != nil {
		return fmt.Errorf("create vm %s/%s: %w", sampleNS, sampleVM, err)
	}
	q.say("created VirtualMachine %s/%s (image %s, 1 vCPU, 128Mi) on %s", sampleNS, sampleVM, guestImage, q.cfg.Node)

	// A daemon that dies ends the wait with its log instead of a hang.
	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	g, gctx := errgroup.WithContext(wctx)
	g.Go(func() error { return q.watchNode(gctx, q.cs) })
	g.Go(func() error { return q.watchPod(gctx, q.cs, sampleNS, samplePod) })
	g.Go(func() error { return q.watchVM(gctx, q.dyn, sampleNS, sampleVM) })
	done := make(chan struct{})
	var watchErr error
	go func() { watchErr = g.Wait(); close(done) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-done:
			if watchErr != nil {
				if dErr := q.daemonsExited(); dErr != nil {
					return dErr
				}
				return watchErr
			}
			q.say(milestoneAllUp+" in %s", time.Since(q.begin).Round(100*time.Millisecond))
			return nil
		case <-tick.C:
			if err := q.daemonsExited(); err != nil {
				cancel(err)
				<-done
				return err
			}
		}
	}
}

// printNext prints where things are and what to type next.
func (q *quickstart) printNext() {
	k := q.cfg.Kubectl + " --kubeconfig " + q.kubecfg
	lines := []string{
		"",
		"The system is running. Try:",
		"  " + k + " get nodes,pods,vm,edgenodes -o wide",
		"  " + k + " describe vm " + sampleVM,
		"  " + k + " run hi --image " + images.BusyboxRef + " --image-pull-policy Never \\",
		"      --overrides '{\"spec\":{\"nodeName\":\"" + q.cfg.Node + "\"}}' -- sh -c 'echo hi; sleep 3600'",
		"  " + filepath.Join(q.cfg.Bin, "cloudcore") + " admin list --kubeconfig " + q.kubecfg,
		"(no scheduler runs here: a pod names its node; images come from the private containerd, imagePullPolicy Never)",
		"Logs: " + q.logDir + "/cloudcore.log, " + q.logDir + "/edgecore.log, " + q.host.LogPath(),
	}
	if q.cfg.ExitAfterReady {
		lines = append(lines, "--exit-after-ready: stopping now.")
	} else {
		lines = append(lines, "Press Ctrl-C to stop everything (nothing is left running or mounted).")
	}
	q.outMu.Lock()
	defer q.outMu.Unlock()
	fmt.Fprintln(q.cfg.Out, strings.Join(lines, "\n"))
}

// stop undoes start in reverse: the edge first drains its pods and VMs
// (deleted through the API, so that the VM powers down and the pod
// manager removes its sandboxes and log directories), then EdgeCore,
// CloudCore, containerd (which removes anything left and reports it), a
// sweep for QEMUs and mounts, the control plane.
func (q *quickstart) stop() error {
	var errs []error
	if q.edge != nil && q.edge.exited() == nil && q.cs != nil {
		if err := q.drain(); err != nil {
			errs = append(errs, err)
		}
	}
	for _, d := range []*daemon{q.edge, q.cloud} {
		if d != nil {
			errs = append(errs, d.stop())
		}
	}
	if q.stopHost != nil {
		errs = append(errs, q.stopHost())
	}
	if q.vmRunDir != "" {
		errs = append(errs, sweep(q.vmRunDir, q.cfg.Dir))
	}
	if q.cp != nil {
		errs = append(errs, q.cp.Stop())
	}
	if q.lock != nil {
		_ = q.lock.Close()
	}
	return errors.Join(errs...)
}

// drain deletes every VirtualMachine (the controller deletes its pod, and
// the edge powers the guest down) and every other pod bound to the edge
// node, with a grace period of one second, and waits until the pods are
// gone: the edge confirms each deletion once it has stopped the pod.
func (q *quickstart) drain() error {
	q.say("deleting the VMs and the pods on %s; the edge stops them", q.cfg.Node)
	ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	vms := cloudvm.NewClient(q.dyn)
	list, err := vms.Resource().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list vms: %w", err)
	}
	for _, v := range list.Items {
		if err := vms.Delete(ctx, v.GetNamespace(), v.GetName()); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete vm %s/%s: %w", v.GetNamespace(), v.GetName(), err)
		}
	}
	onNode := metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", q.cfg.Node).String()}
	pods, err := q.cs.CoreV1().Pods("").List(ctx, onNode)
	if err != nil {
		return fmt.Errorf("list pods on %s: %w", q.cfg.Node, err)
	}
	for _, p := range pods.Items {
		if ownedByVM(&p) {
			continue
		}
		err := q.cs.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64(1))})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete pod %s/%s: %w", p.Namespace, p.Name, err)
		}
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		pods, err := q.cs.CoreV1().Pods("").List(ctx, onNode)
		if err == nil && len(pods.Items) == 0 {
			q.say("    the edge stopped and removed them")
			return nil
		}
		select {
		case <-ctx.Done():
			n := -1
			if pods != nil {
				n = len(pods.Items)
			}
			return fmt.Errorf("the edge did not remove its %d pods within %s (they are removed by force below): %w", n, drainTimeout, errors.Join(err, ctx.Err()))
		case <-tick.C:
		}
	}
}

// ownedByVM reports whether a VirtualMachine controls the pod.
func ownedByVM(p *corev1.Pod) bool {
	for _, o := range p.OwnerReferences {
		if o.Kind == cloudvm.Kind && o.APIVersion == cloudvm.APIVersion {
			return true
		}
	}
	return false
}
