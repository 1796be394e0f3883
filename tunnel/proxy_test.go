package tunnel

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
)

// partitionProxy forwards UDP datagrams and TCP connections on loopback to
// a target and can drop everything, to make a network partition without
// netem. One proxy serves one client.
type partitionProxy struct {
	cut  atomic.Bool
	addr string
	wg   sync.WaitGroup
	stop func()
}

// startUDPProxy forwards datagrams between one client and target.
func startUDPProxy(t *testing.T, target string) *partitionProxy {
	t.Helper()
	front, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	back, err := net.Dial("udp", target)
	require.NoError(t, err)
	p := &partitionProxy{addr: front.LocalAddr().String()}
	var client atomic.Pointer[net.Addr]
	p.wg.Add(2)
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 64<<10)
		for {
			n, from, err := front.ReadFrom(buf)
			if err != nil {
				return
			}
			client.Store(&from)
			if !p.cut.Load() {
				_, _ = back.Write(buf[:n])
			}
		}
	}()
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 64<<10)
		for {
			n, err := back.Read(buf)
			if err != nil {
				return
			}
			if to := client.Load(); to != nil && !p.cut.Load() {
				_, _ = front.WriteTo(buf[:n], *to)
			}
		}
	}()
	p.stop = func() { _ = front.Close(); _ = back.Close(); p.wg.Wait() }
	t.Cleanup(p.stop)
	return p
}

// startTCPProxy forwards TCP connections to target; when cut, bytes are
// read and thrown away, so both ends see a silent peer.
func startTCPProxy(t *testing.T, target string) *partitionProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &partitionProxy{addr: ln.Addr().String()}
	var mu sync.Mutex
	var conns []net.Conn
	pipe := func(dst, src net.Conn) {
		defer p.wg.Done()
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if err != nil {
				if !errors.Is(err, io.EOF) {
					_ = dst.Close()
				}
				return
			}
			if !p.cut.Load() {
				if _, err := dst.Write(buf[:n]); err != nil {
					return
				}
			}
		}
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", target)
			if err != nil {
				_ = c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, b)
			mu.Unlock()
			p.wg.Add(2)
			go pipe(b, c)
			go pipe(c, b)
		}
	}()
	p.stop = func() {
		_ = ln.Close()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		p.wg.Wait()
	}
	t.Cleanup(p.stop)
	return p
}
