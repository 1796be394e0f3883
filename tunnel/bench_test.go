//go:build unix

package tunnel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/tests/testlog"
)

// The benchmarks below measure one loopback session per transport against a
// baseline of plain mutual TLS 1.3 over TCP carrying the same msgpack frames.
// docs/benchmarks.md has the commands, the machine and the figures. They
// report rates and percentiles; none of them asserts on time.

// benchKinds are the connection kinds compared: the two tunnel transports
// and the TLS-over-TCP baseline.
var benchKinds = []string{string(TransportQUIC), string(TransportWebSocket), "tls-tcp"}

var benchSizes = []struct {
	name string
	size int
}{
	{"256B", 256},
	{"4KiB", 4 << 10},
	{"1MiB", 1 << 20},
}

// benchWait bounds how long a benchmark waits for the far end; reaching it
// means the tunnel lost messages or stalled, and fails the benchmark.
const benchWait = 2 * time.Minute

// benchOptions are the tunnel settings of the throughput and latency
// benchmarks: defaults, but quiet, and a keepalive that a busy two-core
// machine does not trip.
func benchOptions() Options {
	return Options{
		KeepAlive:        time.Second,
		DeadPeerTimeout:  10 * time.Second,
		HandshakeTimeout: 10 * time.Second,
		Logger:           testlog.New(),
	}
}

// benchMessage is the envelope every benchmark sends: an event about one
// object, with a payload of the given size.
func benchMessage(size int) *message.Message {
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i)
	}
	return &message.Message{
		Kind:     message.KindEvent,
		Op:       message.OpUpsert,
		Node:     "edge-1",
		Resource: message.Resource{Version: "v1", Kind: "ConfigMap", Namespace: "default", Name: "bench"},
		Version:  "12345",
		Time:     time.Now().UnixNano(),
		Payload:  payload,
	}
}

// benchPeer is one end of a benchmarked connection, seen from the sender.
type benchPeer interface {
	send(ctx context.Context, m *message.Message) error
	// flush pushes out what send buffered; the tunnel does it by itself.
	flush() error
	recv(ctx context.Context) (*message.Message, error)
}

type sessionPeer struct{ s *Session }

func (p sessionPeer) send(ctx context.Context, m *message.Message) error { return p.s.Send(ctx, m) }
func (p sessionPeer) flush() error                                       { return nil }
func (p sessionPeer) recv(ctx context.Context) (*message.Message, error) {
	return p.s.Recv(ctx)
}

// quicStats returns the statistics of the QUIC connection under the
// session; ok is false on other transports.
func (p sessionPeer) quicStats() (st quic.ConnectionStats, ok bool) {
	if p.s == nil {
		return st, false
	}
	l, ok := p.s.link.(*quicLink)
	if !ok {
		return st, false
	}
	return l.conn.ConnectionStats(), true
}

// tlsPeer is one end of the baseline: length-prefixed msgpack frames on a
// TLS connection, written through a bufio.Writer and read through a
// bufio.Reader. It encodes and decodes exactly as a session does (a new
// frame from AppendFrame per message, ReadFrame and Unmarshal per frame);
// the difference is the transport and the session's queues and goroutines.
type tlsPeer struct {
	br    *bufio.Reader
	bw    *bufio.Writer
	codec *message.Codec
}

func newTLSPeer(conn *tls.Conn) *tlsPeer {
	return &tlsPeer{
		// The same read buffer as a QUIC link, and a write buffer the size
		// of the session writer's largest batch.
		br:    bufio.NewReaderSize(conn, 4096),
		bw:    bufio.NewWriterSize(conn, maxBatch),
		codec: message.NewCodec(0),
	}
}

func (p *tlsPeer) send(_ context.Context, m *message.Message) error {
	frame, err := p.codec.AppendFrame(nil, m)
	if err != nil {
		return err
	}
	_, err = p.bw.Write(frame)
	return err
}

func (p *tlsPeer) flush() error { return p.bw.Flush() }

func (p *tlsPeer) recv(context.Context) (*message.Message, error) {
	body, err := p.codec.ReadFrame(p.br)
	if err != nil {
		return nil, err
	}
	m := new(message.Message)
	if err := p.codec.Unmarshal(body, m); err != nil {
		return nil, err
	}
	return m, nil
}

// sink counts the messages a receiver got and signals when the count
// reaches the target set by expect.
type sink struct {
	msgs    atomic.Int64
	bytes   atomic.Int64
	want    atomic.Int64
	reached chan struct{}
}

func newSink() *sink { return &sink{reached: make(chan struct{}, 1)} }

func (k *sink) add(m *message.Message) {
	k.bytes.Add(int64(len(m.Payload)))
	if k.msgs.Add(1) == k.want.Load() {
		k.reached <- struct{}{}
	}
}

// expect arms the sink for n more messages; call it before sending them.
func (k *sink) expect(n int) { k.want.Store(k.msgs.Load() + int64(n)) }

// wait returns once every expected message has been received.
func (k *sink) wait(b *testing.B) {
	b.Helper()
	t := time.NewTimer(benchWait)
	defer t.Stop()
	select {
	case <-k.reached:
	case <-t.C:
		b.Fatalf("receiver got %d of %d messages in %s", k.msgs.Load(), k.want.Load(), benchWait)
	}
}

// handler returns a tunnel handler that feeds every received message to k.
func (k *sink) handler() Handler {
	return HandlerFunc(func(ctx context.Context, s *Session) {
		for {
			m, err := s.Recv(ctx)
			if err != nil {
				return
			}
			k.add(m)
		}
	})
}

// serve feeds every message the baseline peer receives to k.
func (k *sink) serve(p *tlsPeer) error {
	for {
		m, err := p.recv(context.Background())
		if err != nil {
			return err
		}
		k.add(m)
	}
}

// echoTLS answers every message like the tunnel's echo handler, flushing
// when no more input is buffered.
func echoTLS(p *tlsPeer) error {
	for {
		m, err := p.recv(context.Background())
		if err != nil {
			return err
		}
		reply := &message.Message{Kind: message.KindAck, ReplyTo: m.ID, Node: m.Node, Payload: m.Payload}
		if err := p.send(context.Background(), reply); err != nil {
			return err
		}
		if p.br.Buffered() == 0 {
			if err := p.flush(); err != nil {
				return err
			}
		}
	}
}

// startBenchServer runs a tunnel server for one transport on loopback. The
// returned stop is idempotent and also runs when the benchmark ends.
func startBenchServer(b testing.TB, ca *testCA, tr Transport, opts Options, h Handler) (*Server, func()) {
	b.Helper()
	// With a ticket secret, as CloudCore runs: every session gets a ticket.
	cfg := ServerConfig{Options: opts, TLS: ca.serverTLS(b), Handler: h, SessionTicketSecret: &[32]byte{1}}
	if tr == TransportQUIC {
		cfg.QUICAddr = "127.0.0.1:0"
	} else {
		cfg.WebSocketAddr = "127.0.0.1:0"
	}
	srv, err := NewServer(cfg)
	require.NoError(b, err)
	require.NoError(b, srv.Listen())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				b.Errorf("server run: %v", err)
			}
		})
	}
	b.Cleanup(stop)
	return srv, stop
}

// serverAddr returns the address a client uses to reach srv on tr.
func serverAddr(srv *Server, tr Transport) string {
	if tr == TransportQUIC {
		return "quic://" + srv.QUICAddr().String()
	}
	return "wss://" + srv.WebSocketAddr().String()
}

// dialBench connects one sender to a receiver of the given kind: a tunnel
// server running h, or a baseline TLS server running serve.
func dialBench(b *testing.B, ca *testCA, kind string, h Handler, serve func(*tlsPeer) error) benchPeer {
	b.Helper()
	if kind == "tls-tcp" {
		return dialTLSBaseline(b, ca, serve)
	}
	tr := Transport(kind)
	srv, _ := startBenchServer(b, ca, tr, benchOptions(), h)
	c, err := NewClient(ClientConfig{
		Options: benchOptions(),
		Servers: []string{serverAddr(srv, tr)},
		Node:    "edge-1",
		TLS:     ca.clientTLS(b, certOpts{cn: "edge-1"}),
	})
	require.NoError(b, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sess, err := c.Dial(ctx)
	require.NoError(b, err)
	b.Cleanup(func() { _ = sess.Close("benchmark done") })
	return sessionPeer{sess}
}

// dialTLSBaseline starts a mutual TLS 1.3 server on loopback TCP that
// serves one connection with serve, and returns the client end.
func dialTLSBaseline(b *testing.B, ca *testCA, serve func(*tlsPeer) error) benchPeer {
	b.Helper()
	scfg := ca.serverTLS(b)
	scfg.ClientAuth = tls.RequireAndVerifyClientCert
	ln, err := tls.Listen("tcp", "127.0.0.1:0", scfg)
	require.NoError(b, err)
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		_ = ln.Close()
		if err != nil {
			done <- err
			return
		}
		conn := c.(*tls.Conn)
		defer conn.Close()
		if err := conn.Handshake(); err != nil {
			done <- err
			return
		}
		done <- serve(newTLSPeer(conn))
	}()
	b.Cleanup(func() {
		_ = ln.Close() // ends Accept if the dial below failed
		if err := <-done; err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
			b.Errorf("baseline server: %v", err)
		}
	})
	conn, err := tls.Dial("tcp", ln.Addr().String(), ca.clientTLS(b, certOpts{cn: "edge-1"}))
	require.NoError(b, err)
	b.Cleanup(func() { _ = conn.Close() }) // runs first: the server sees EOF
	require.NoError(b, conn.Handshake())
	require.Equal(b, uint16(tls.VersionTLS13), conn.ConnectionState().Version)
	return newTLSPeer(conn)
}

// BenchmarkThroughput sends b.N messages one way over one connection and
// stops the clock when the receiver has decoded the last of them, so the
// rate is delivery, not queueing. MB/s counts payload bytes.
func BenchmarkThroughput(b *testing.B) {
	ca := newTestCA(b)
	for _, kind := range benchKinds {
		b.Run(kind, func(b *testing.B) {
			k := newSink()
			p := dialBench(b, ca, kind, k.handler(), k.serve)
			for _, sz := range benchSizes {
				b.Run(sz.name, func(b *testing.B) {
					ctx, cancel := context.WithTimeout(context.Background(), benchWait)
					defer cancel()
					m := benchMessage(sz.size)
					startBytes := k.bytes.Load()
					qp, _ := p.(sessionPeer)
					qs0, isQUIC := qp.quicStats()
					b.SetBytes(int64(sz.size))
					b.ReportAllocs()
					k.expect(b.N)
					b.ResetTimer()
					cpu0 := cpuTime()
					for i := range b.N {
						m.ID = uint64(i + 1)
						if err := p.send(ctx, m); err != nil {
							b.Fatalf("send %d: %v", i, err)
						}
					}
					if err := p.flush(); err != nil {
						b.Fatal(err)
					}
					k.wait(b)
					b.StopTimer()
					reportCPU(b, cpu0)
					if got, want := k.bytes.Load()-startBytes, int64(b.N)*int64(sz.size); got != want {
						b.Fatalf("receiver got %d payload bytes, want %d", got, want)
					}
					b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
					if qs1, _ := qp.quicStats(); isQUIC && qs1.PacketsSent > qs0.PacketsSent {
						// Packets the sender declared lost on loopback (the
						// receiver did not drain its UDP socket in time), and
						// the sender's smoothed RTT and congestion window at
						// the end: a window per RTT bounds the rate.
						b.ReportMetric(100*float64(qs1.PacketsLost-qs0.PacketsLost)/float64(qs1.PacketsSent-qs0.PacketsSent), "lost-%")
						b.ReportMetric(micros(qs1.SmoothedRTT), "srtt-us")
						b.ReportMetric(float64(qs1.CongestionWindow)/1024, "cwnd-KiB")
					}
				})
			}
		})
	}
}

// BenchmarkLatency measures round trips of a 256-byte message: send one,
// wait for the echo, repeat. ns/op is the mean; p50-us and p99-us are
// percentiles of the individual round trips in microseconds.
func BenchmarkLatency(b *testing.B) {
	ca := newTestCA(b)
	for _, kind := range benchKinds {
		b.Run(kind, func(b *testing.B) {
			p := dialBench(b, ca, kind, echo, echoTLS)
			b.Run("256B", func(b *testing.B) {
				ctx, cancel := context.WithTimeout(context.Background(), benchWait)
				defer cancel()
				m := benchMessage(256)
				rtts := make([]time.Duration, b.N)
				b.ReportAllocs()
				b.ResetTimer()
				cpu0 := cpuTime()
				for i := range b.N {
					m.ID = uint64(i + 1)
					start := time.Now()
					if err := p.send(ctx, m); err != nil {
						b.Fatalf("send %d: %v", i, err)
					}
					if err := p.flush(); err != nil {
						b.Fatal(err)
					}
					reply, err := p.recv(ctx)
					if err != nil {
						b.Fatalf("receive %d: %v", i, err)
					}
					rtts[i] = time.Since(start)
					if reply.ReplyTo != m.ID {
						b.Fatalf("reply to %d, want %d", reply.ReplyTo, m.ID)
					}
				}
				b.StopTimer()
				reportCPU(b, cpu0)
				slices.Sort(rtts)
				b.ReportMetric(micros(percentile(rtts, 50)), "p50-us")
				b.ReportMetric(micros(percentile(rtts, 99)), "p99-us")
			})
		})
	}
}

// cpuTime returns the CPU time this process has used, user and system, on
// all threads. Both ends of a benchmarked connection run in this process,
// so its growth is the whole cost of the messages, the kernel's share of
// loopback included. Unlike ns/op it does not grow when other tenants of
// the machine take the CPU away.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the CPU time used since start per iteration.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
}

// percentile returns the p-th percentile (nearest rank) of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// Idle-session memory. The benchmark process runs only the server; the
// clients run in a child process (this test binary again, running
// TestIdleClientsHelper), so the memory growth of this process is the
// server's alone.

// idleSessions is how many idle sessions BenchmarkIdleSessionMemory holds.
const idleSessions = 2000

// Environment of the helper process.
const (
	idleEnvDir  = "TETHER_BENCH_IDLE_DIR" // holds ca.pem and ca-key.pem
	idleEnvAddr = "TETHER_BENCH_IDLE_ADDR"
	idleEnvN    = "TETHER_BENCH_IDLE_N"
	idleReady   = "TETHER_IDLE_CLIENTS_READY"
	// idleEnvProfile, when set for the benchmark process, names a directory
	// that receives heap and goroutine profiles of the server while it holds
	// the idle sessions.
	idleEnvProfile = "TETHER_BENCH_IDLE_PROFILE"
)

// idleOptions keep idle sessions alive (a keepalive every second, declared
// dead after 10s of silence) without much traffic from 2,000 of them.
func idleOptions() Options {
	return Options{
		KeepAlive:        time.Second,
		DeadPeerTimeout:  10 * time.Second,
		HandshakeTimeout: 30 * time.Second,
		Logger:           testlog.New(),
	}
}

// BenchmarkIdleSessionMemory establishes idleSessions sessions from a child
// process and reports what the server holds for each: HeapInuse+StackInuse
// after a GC, before and after, divided by the session count. It measures
// once per run whatever b.N is; ns/op is not reported.
func BenchmarkIdleSessionMemory(b *testing.B) {
	if os.Getenv(idleEnvProfile) != "" {
		// Sample every allocation of 4 KiB (rather than of 512 KiB) so that
		// the heap profile attributes per-session memory precisely.
		defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
		runtime.MemProfileRate = 4 << 10
	}
	// Go raises the soft limit on open files to the hard limit at start; a
	// child holds one socket per session, and the server one per WebSocket
	// session.
	var lim syscall.Rlimit
	require.NoError(b, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim))
	if lim.Max < idleSessions+512 {
		b.Skipf("needs %d open files, the hard limit is %d (ulimit -Hn)", idleSessions+512, lim.Max)
	}
	ca := newTestCA(b)
	dir := b.TempDir()
	writeCA(b, ca, dir)
	for _, tr := range transports {
		b.Run(string(tr), func(b *testing.B) {
			// One measurement whatever b.N is: the figures are not per
			// iteration, and -benchtime 100x must not hold 200,000 sessions.
			f, cf := measureIdle(b, ca, dir, tr, idleSessions)
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(float64(f.heap+f.stack)/idleSessions, "B/session")
			b.ReportMetric(float64(f.heap)/idleSessions, "heap-B/session")
			b.ReportMetric(float64(f.live)/idleSessions, "live-B/session")
			b.ReportMetric(float64(f.stack)/idleSessions, "stack-B/session")
			b.ReportMetric(float64(f.goroutines)/idleSessions, "goroutines/session")
			b.ReportMetric(float64(cf.heap+cf.stack)/idleSessions, "client-B/session")
			b.ReportMetric(float64(cf.heap)/idleSessions, "client-heap-B/session")
			b.ReportMetric(float64(cf.stack)/idleSessions, "client-stack-B/session")
			b.ReportMetric(float64(cf.goroutines)/idleSessions, "client-goroutines/session")
		})
	}
}

// idleFigures are memory figures of this process, or their growth.
type idleFigures struct {
	heap       int64 // HeapInuse: spans in use, including their free slots
	live       int64 // HeapAlloc: bytes of live objects
	stack      int64 // StackInuse
	goroutines int
}

func (f idleFigures) minus(g idleFigures) idleFigures {
	return idleFigures{f.heap - g.heap, f.live - g.live, f.stack - g.stack, f.goroutines - g.goroutines}
}

// measureIdle returns the growth of this process (the server) and of the
// child (the clients) while they hold n idle sessions.
func measureIdle(b *testing.B, ca *testCA, dir string, tr Transport, n int) (server, client idleFigures) {
	b.Helper()
	var live atomic.Int64
	allUp := make(chan struct{})
	var once sync.Once
	h := HandlerFunc(func(ctx context.Context, s *Session) {
		if live.Add(1) == int64(n) {
			once.Do(func() { close(allUp) })
		}
		defer live.Add(-1)
		select {
		case <-ctx.Done():
		case <-s.Done():
		}
	})
	srv, stopServer := startBenchServer(b, ca, tr, idleOptions(), h)
	defer stopServer()

	before := memNow()

	child := startIdleClients(b, dir, serverAddr(srv, tr), n)
	defer child.stop(b)
	child.waitReady(b)
	t := time.NewTimer(benchWait)
	defer t.Stop()
	select {
	case <-allUp:
	case <-t.C:
		b.Fatalf("server holds %d of %d sessions", live.Load(), n)
	}

	after := memNow()
	if dir := os.Getenv(idleEnvProfile); dir != "" {
		writeProfiles(b, dir, string(tr))
	}
	if got := live.Load(); got != int64(n) {
		b.Fatalf("%d of %d sessions ended while idle", int64(n)-got, n)
	}
	return after.minus(before), child.figures(b)
}

// memNow returns this process's memory after collecting garbage (twice, so
// that sync.Pool victims are gone too).
func memNow() idleFigures {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return idleFigures{
		heap:       int64(ms.HeapInuse),
		live:       int64(ms.HeapAlloc),
		stack:      int64(ms.StackInuse),
		goroutines: runtime.NumGoroutine(),
	}
}

// writeProfiles writes the heap and goroutine profiles of this process.
func writeProfiles(b *testing.B, dir, name string) {
	b.Helper()
	for _, prof := range []string{"heap", "goroutine"} {
		f, err := os.Create(filepath.Join(dir, name+"-"+prof+".pprof"))
		require.NoError(b, err)
		require.NoError(b, pprof.Lookup(prof).WriteTo(f, 0))
		require.NoError(b, f.Close())
	}
}

// writeCA stores the CA's certificate and key for the helper process, which
// issues its own client certificates.
func writeCA(b *testing.B, ca *testCA, dir string) {
	b.Helper()
	key, err := x509.MarshalECPrivateKey(ca.key)
	require.NoError(b, err)
	require.NoError(b, os.WriteFile(filepath.Join(dir, "ca.pem"),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}), 0o600))
	require.NoError(b, os.WriteFile(filepath.Join(dir, "ca-key.pem"),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: key}), 0o600))
}

func readCA(t testing.TB, dir string) *testCA {
	t.Helper()
	certPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	require.NoError(t, err)
	keyPEM, err := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	require.NoError(t, err)
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	require.NotNil(t, cb)
	require.NotNil(t, kb)
	cert, err := x509.ParseCertificate(cb.Bytes)
	require.NoError(t, err)
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// idleChild is the helper process holding the client ends.
type idleChild struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *childOutput
	exited chan struct{}
	err    error // set before exited is closed
	once   sync.Once
}

func startIdleClients(b *testing.B, dir, addr string, n int) *idleChild {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestIdleClientsHelper$", "-test.count=1", "-test.timeout=10m")
	cmd.Env = append(os.Environ(), idleEnvDir+"="+dir, idleEnvAddr+"="+addr, idleEnvN+"="+strconv.Itoa(n))
	out := &childOutput{ready: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = out, out
	stdin, err := cmd.StdinPipe()
	require.NoError(b, err)
	require.NoError(b, cmd.Start())
	c := &idleChild{cmd: cmd, stdin: stdin, out: out, exited: make(chan struct{})}
	go func() { // joined by stop
		c.err = cmd.Wait()
		close(c.exited)
	}()
	b.Cleanup(func() { c.stop(b) })
	return c
}

func (c *idleChild) waitReady(b *testing.B) {
	b.Helper()
	t := time.NewTimer(benchWait)
	defer t.Stop()
	select {
	case <-c.out.ready:
	case <-c.exited:
		b.Fatalf("client process exited before its sessions were up: %v\n%s", c.err, c.out.String())
	case <-t.C:
		b.Fatalf("client process not ready after %s\n%s", benchWait, c.out.String())
	}
}

// figures returns the growth of the child's memory that its ready line
// reports.
func (c *idleChild) figures(b *testing.B) idleFigures {
	b.Helper()
	out := c.out.String()
	i := strings.Index(out, idleReady)
	require.GreaterOrEqual(b, i, 0)
	line, _, _ := strings.Cut(out[i:], "\n")
	var f idleFigures
	var n int
	_, err := fmt.Sscanf(line, idleReady+" %d sessions heap=%d live=%d stack=%d goroutines=%d",
		&n, &f.heap, &f.live, &f.stack, &f.goroutines)
	require.NoError(b, err, "ready line %q", line)
	return f
}

// stop tells the child to close its sessions (by closing its stdin) and
// waits for it, killing it if it does not exit.
func (c *idleChild) stop(b *testing.B) {
	c.once.Do(func() {
		_ = c.stdin.Close()
		t := time.NewTimer(time.Minute)
		defer t.Stop()
		select {
		case <-c.exited:
		case <-t.C:
			_ = c.cmd.Process.Kill()
			<-c.exited
		}
		if c.err != nil {
			b.Errorf("client process: %v\n%s", c.err, c.out.String())
		}
	})
}

// childOutput collects the child's output and notices its ready line.
type childOutput struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	ready chan struct{}
	seen  bool
}

func (w *childOutput) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if !w.seen && bytes.Contains(w.buf.Bytes(), []byte(idleReady)) {
		w.seen = true
		close(w.ready)
	}
	return len(p), nil
}

func (w *childOutput) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// TestIdleClientsHelper is not a test: it is the client process of
// BenchmarkIdleSessionMemory, and skips unless started by it. It dials the
// sessions, prints the ready line, holds them until stdin closes, and then
// closes them.
func TestIdleClientsHelper(t *testing.T) {
	dir := os.Getenv(idleEnvDir)
	if dir == "" {
		t.Skip("client process of BenchmarkIdleSessionMemory")
	}
	ca := readCA(t, dir)
	addr := os.Getenv(idleEnvAddr)
	n, err := strconv.Atoi(os.Getenv(idleEnvN))
	require.NoError(t, err)

	// Each session is its own node with its own certificate, as in the
	// field. The child's growth counts what each edge holds: its
	// certificate, its client and its session.
	before := memNow()
	clients := make([]*Client, n)
	for i := range clients {
		node := fmt.Sprintf("edge-%05d", i)
		clients[i], err = NewClient(ClientConfig{
			Options:     idleOptions(),
			Servers:     []string{addr},
			Node:        node,
			TLS:         ca.clientTLS(t, certOpts{cn: node}),
			DialTimeout: 30 * time.Second,
		})
		require.NoError(t, err)
	}
	sessions := make([]*Session, n)
	defer closeAll(sessions)
	g, ctx := errgroup.WithContext(context.Background())
	g.SetLimit(8)
	start := time.Now()
	for i, c := range clients {
		g.Go(func() error {
			s, err := c.Dial(ctx)
			if err != nil {
				return fmt.Errorf("dial session %d: %w", i, err)
			}
			sessions[i] = s
			return nil
		})
	}
	require.NoError(t, g.Wait())
	took := time.Since(start)
	f := memNow().minus(before)
	fmt.Printf("%s %d sessions heap=%d live=%d stack=%d goroutines=%d in %s\n",
		idleReady, n, f.heap, f.live, f.stack, f.goroutines, took.Round(time.Millisecond))
	_, _ = io.Copy(io.Discard, os.Stdin)
	dead := 0
	for _, s := range sessions {
		if s.Err() != nil {
			dead++
		}
	}
	require.Zero(t, dead, "sessions ended while idle")
}

// closeAll closes the sessions that were established, a few at a time.
func closeAll(sessions []*Session) {
	var g errgroup.Group
	g.SetLimit(16)
	for _, s := range sessions {
		if s != nil {
			g.Go(func() error { return s.Close("benchmark done") })
		}
	}
	_ = g.Wait()
}
