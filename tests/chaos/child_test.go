package chaos

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/tools/clientcmd"

	cloudapp "github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tunnel"
)

// childEnv names the JSON file of a childSpec; set, the test binary is a
// child process.
const childEnv = "TETHER_CHAOS_CHILD"

// Tunnel timings of every process: the production keepalive, and a
// dead-peer timeout of 30 s, as an operator sets it for a weak network.
// A 2 s flap stays well under it, and so does a 12 s partition, which
// outlives the cloud's resend timer (10 s): the session survives (QUIC's
// probe backoff sends the next probe about 15 s into the silence, so a
// 15 s timeout would end it) and the cloud resends while the first copies
// are still in transit. A 20 s partition may end a session.
const (
	keepAlive       = 5 * time.Second
	deadPeerTimeout = 30 * time.Second
	// statusEvery is how often the edge refreshes its Ready condition.
	statusEvery = 5 * time.Second
)

// childSpec tells a child what to be.
type childSpec struct {
	Role string `json:"role"` // "cloud" or "edge"
	// Cloud: the kubeconfig, the tunnel and join addresses and the CA Secret.
	KubeConfig  string `json:"kubeconfig,omitempty"`
	QUIC        string `json:"quic,omitempty"`
	WebSocket   string `json:"websocket,omitempty"`
	Join        string `json:"join,omitempty"`
	CANamespace string `json:"caNamespace,omitempty"`
	CAName      string `json:"caName,omitempty"`
	// Edge: its node, the cloud address, its identity and data directory
	// and the file recording what it applies.
	Node    string `json:"node,omitempty"`
	Cloud   string `json:"cloud,omitempty"`
	Dir     string `json:"dir,omitempty"`
	Applied string `json:"applied,omitempty"`
	// Ready is created once the child listens (cloud) or runs (edge).
	Ready string `json:"ready"`
}

// runChild runs CloudCore or EdgeCore until SIGTERM (or, as the test
// intends, SIGKILL) and returns the exit code.
func runChild(specFile string) int {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := child(specFile, logger); err != nil {
		logger.Error("chaos child failed", "err", err)
		return 1
	}
	return 0
}

func child(specFile string, logger *slog.Logger) error {
	b, err := os.ReadFile(specFile)
	if err != nil {
		return err
	}
	var spec childSpec
	if err := json.Unmarshal(b, &spec); err != nil {
		return fmt.Errorf("decode %s: %w", specFile, err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	switch spec.Role {
	case "cloud":
		return runCloud(ctx, spec, logger)
	case "edge":
		return runEdge(ctx, spec, logger.With("node", spec.Node))
	}
	return fmt.Errorf("unknown child role %q", spec.Role)
}

func runCloud(ctx context.Context, spec childSpec, logger *slog.Logger) error {
	kc, err := clientcmd.BuildConfigFromFlags("", spec.KubeConfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	// Client-go's default 5 QPS would throttle the churn's fan-out.
	kc.QPS, kc.Burst = 1000, 2000
	a, err := cloudapp.New(ctx, cloudapp.Config{
		Kubernetes: kc, QUICAddr: spec.QUIC, WebSocketAddr: spec.WebSocket, JoinAddr: spec.Join,
		ServerSANs: []string{"127.0.0.1"}, CANamespace: spec.CANamespace, CAName: spec.CAName,
		KeepAlive: keepAlive, DeadPeerTimeout: deadPeerTimeout, Logger: logger,
	})
	if err != nil {
		return err
	}
	if err := a.Listen(); err != nil {
		return err
	}
	if err := os.WriteFile(spec.Ready, nil, 0o600); err != nil {
		return err
	}
	return a.Run(ctx)
}

func runEdge(ctx context.Context, spec childSpec, logger *slog.Logger) error {
	pair, _, _, err := edgejoin.Load(spec.Dir)
	if err != nil {
		return err
	}
	ca, err := loadCACert(filepath.Join(spec.Dir, edgejoin.CAFile))
	if err != nil {
		return err
	}
	rec, err := openRecorder(spec.Applied)
	if err != nil {
		return err
	}
	defer rec.close()
	a, err := edgeapp.New(ctx, edgeapp.Config{
		Cloud: []string{spec.Cloud}, Node: spec.Node, Certificate: pair, CA: ca,
		IdentityDir: spec.Dir, DataDir: spec.Dir,
		KeepAlive: keepAlive, DeadPeerTimeout: deadPeerTimeout,
		Backoff:    tunnel.Backoff{Min: 100 * time.Millisecond, Max: time.Second},
		NodeStatus: nodestatus.Config{StatusEvery: statusEvery},
		WrapStore:  rec.wrap, Logger: logger,
	})
	if err != nil {
		return err
	}
	if err := os.WriteFile(spec.Ready, nil, 0o600); err != nil {
		return errors.Join(err, a.Close())
	}
	err = a.Run(ctx)
	return errors.Join(err, a.Close())
}

func loadCACert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, fmt.Errorf("read %s: no PEM block", path)
	}
	return x509.ParseCertificate(block.Bytes)
}

// recorder wraps the edge store and appends one line per change to a file
// after each commit: what the edge applied, in order. A SIGKILL between a
// commit and its line loses the line; the parent's snapshot of the store
// after the kill covers it.
//
// Lines, tab-separated: "U time key uid resourceVersion" for an upsert,
// "D time key" for a delete event, "P time key" for a key a prune removed.
type recorder struct {
	mu sync.Mutex
	f  *os.File
}

func openRecorder(path string) (*recorder, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	return &recorder{f: f}, nil
}

func (r *recorder) close() { _ = r.f.Close() }

func (r *recorder) wrap(st *store.Store) syncer.Store { return &recordingStore{Store: st, rec: r} }

// write appends a batch's lines in one write, so a kill leaves whole lines
// (but for, at worst, the last one, which the parent drops).
func (r *recorder) write(b []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, err := r.f.Write(b); err != nil {
		return fmt.Errorf("record applied changes: %w", err)
	}
	return nil
}

type recordingStore struct {
	*store.Store
	rec *recorder
}

func (s *recordingStore) Apply(ctx context.Context, changes []store.Change) error {
	if err := s.Store.Apply(ctx, changes); err != nil {
		return err
	}
	now := strconv.FormatInt(time.Now().UnixNano(), 10)
	var b bytes.Buffer
	for _, c := range changes {
		k := c.Object.Key().String()
		if c.Op == message.OpDelete {
			fmt.Fprintf(&b, "D\t%s\t%s\n", now, k)
		} else {
			fmt.Fprintf(&b, "U\t%s\t%s\t%s\t%s\n", now, k, c.Object.Resource.UID, c.Object.Version)
		}
	}
	return s.rec.write(b.Bytes())
}

func (s *recordingStore) DeleteByKeyHash(ctx context.Context, hashes []uint64) ([]objsync.Key, error) {
	keys, err := s.Store.DeleteByKeyHash(ctx, hashes)
	if err != nil {
		return keys, err
	}
	now := strconv.FormatInt(time.Now().UnixNano(), 10)
	var b bytes.Buffer
	for _, k := range keys {
		fmt.Fprintf(&b, "P\t%s\t%s\n", now, k.String())
	}
	return keys, s.rec.write(b.Bytes())
}
