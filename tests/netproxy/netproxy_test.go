package netproxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// udpEcho answers every datagram with itself.
func udpEcho(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, maxDatagram)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteTo(buf[:n], from)
		}
	}()
	t.Cleanup(func() { _ = c.Close(); <-done })
	return c.LocalAddr().String()
}

// tcpEcho copies every connection back to itself.
func tcpEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); _ = c.Close() }()
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); <-done })
	return ln.Addr().String()
}

func TestUDPLossDelayPartition(t *testing.T) {
	p := Start(t, udpEcho(t), Options{Network: "udp"})
	c, err := net.Dial("udp", p.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	roundTrip := func(b []byte, timeout time.Duration) (time.Duration, bool) {
		start := time.Now()
		_, err := c.Write(b)
		require.NoError(t, err)
		_ = c.SetReadDeadline(start.Add(timeout))
		got := make([]byte, maxDatagram)
		n, err := c.Read(got)
		if err != nil {
			return 0, false
		}
		require.Equal(t, b, got[:n])
		return time.Since(start), true
	}
	_, ok := roundTrip([]byte("hello"), 5*time.Second)
	require.True(t, ok, "clean path")

	p.SetDelay(50 * time.Millisecond)
	rtt, ok := roundTrip([]byte("slow"), 5*time.Second)
	require.True(t, ok)
	require.GreaterOrEqual(t, rtt, 100*time.Millisecond, "delay applies each way")
	p.SetDelay(0)

	// 50 % loss each way: about a quarter of round trips succeed. The
	// reply of a lost round trip may arrive late; numbering tells them apart.
	p.SetLoss(0.5)
	const n = 400
	for i := range n {
		_, err := c.Write([]byte{byte(i >> 8), byte(i)})
		require.NoError(t, err)
	}
	got := 0
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	for buf := make([]byte, 8); ; got++ {
		if _, err := c.Read(buf); err != nil {
			break
		}
	}
	require.InDelta(t, n/4, got, n/8, "round trips through 50%% loss each way")
	p.SetLoss(0)

	p.Partition(true)
	_, ok = roundTrip([]byte("cut"), 300*time.Millisecond)
	require.False(t, ok, "a partition drops everything")
	p.Partition(false)
	_, ok = roundTrip([]byte("healed"), 5*time.Second)
	require.True(t, ok, "the path heals")
	st := p.Stats()
	require.Equal(t, int64(1), st.Flows)
	require.Positive(t, st.Dropped)
}

func TestTCPPartitionStallsWithoutLosingBytes(t *testing.T) {
	p := Start(t, tcpEcho(t), Options{Network: "tcp", StallTime: 20 * time.Millisecond})
	c, err := net.Dial("tcp", p.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	// Every chunk is "lost": held for StallTime, never dropped (a loss
	// below 1 may stall no chunk at all, the few chunks 64 KiB makes).
	p.SetLoss(1)
	p.SetDelay(5 * time.Millisecond)
	want := bytes.Repeat([]byte("0123456789abcdef"), 64<<10/16)
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(want))
		_, _ = io.ReadFull(c, b)
		got <- b
	}()
	_, err = c.Write(want[:len(want)/2])
	require.NoError(t, err)
	p.Partition(true)
	select {
	case <-got:
		t.Fatal("bytes crossed a partition")
	case <-time.After(300 * time.Millisecond):
	}
	_, err = c.Write(want[len(want)/2:])
	require.NoError(t, err)
	p.Partition(false)
	select {
	case b := <-got:
		require.Equal(t, want, b, "every byte arrives, in order, after the partition heals")
	case <-time.After(10 * time.Second):
		t.Fatal("the stream did not resume after the partition")
	}
	require.Positive(t, p.Stats().Stalled)
}

func TestTCPNewConnectionWaitsForHeal(t *testing.T) {
	p := Start(t, tcpEcho(t), Options{Network: "tcp"})
	p.Partition(true)
	c, err := net.Dial("tcp", p.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte("x"))
	require.NoError(t, err)
	_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	_, err = c.Read(make([]byte, 1))
	require.Error(t, err, "no answer through a partition")
	p.Partition(false)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 1)
	_, err = io.ReadFull(c, b)
	require.NoError(t, err)
	require.Equal(t, "x", string(b))
}

func TestRunEndsWithContext(t *testing.T) {
	p, err := New(udpEcho(t), Options{})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	cancel()
	require.NoError(t, <-done)
	require.NoError(t, p.Close())
	require.NoError(t, p.Close(), "Close is idempotent")
	require.Error(t, p.Run(context.Background()), "a closed proxy does not run again")
}
