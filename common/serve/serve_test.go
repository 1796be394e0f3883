package serve

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// TestServe runs the endpoint on a real loopback listener: metrics from
// the registry, readyz failing until its check passes, livez passing, and
// a clean shutdown (goleak in TestMain).
func TestServe(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_serve_test_total", Help: "test"})
	require.NoError(t, reg.Register(c))
	c.Add(3)
	var synced atomic.Bool
	s, err := New(Config{
		Addr:     "127.0.0.1:0",
		Gatherer: reg,
		Ready: []Check{
			{Name: "ping", Func: ok},
			{Name: "informers-synced", Func: func(context.Context) error {
				if !synced.Load() {
					return errors.New("not synced yet")
				}
				return nil
			}},
		},
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	base := "http://" + s.Addr().String()

	code, body := get(t, base+"/metrics")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "tether_serve_test_total 3")

	code, body = get(t, base+"/readyz")
	require.Equal(t, http.StatusInternalServerError, code)
	require.Contains(t, body, "[-]informers-synced failed: not synced yet")
	require.Contains(t, body, "[+]ping ok")

	code, body = get(t, base+"/readyz?exclude=informers-synced")
	require.Equal(t, http.StatusOK, code, body)
	code, body = get(t, base+"/readyz/informers-synced")
	require.Equal(t, http.StatusInternalServerError, code)
	require.Equal(t, "[-]informers-synced failed: not synced yet\nreadyz check failed\n", body)
	code, body = get(t, base+"/readyz/ping")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ok", body)
	code, _ = get(t, base+"/readyz/nonesuch")
	require.Equal(t, http.StatusNotFound, code)

	synced.Store(true)
	code, body = get(t, base+"/readyz")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ok", body)
	code, body = get(t, base+"/readyz?verbose")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "[+]informers-synced ok\n")
	require.Contains(t, body, "readyz check passed")

	for _, p := range []string{"/livez", "/healthz"} {
		code, body = get(t, base+p)
		require.Equal(t, http.StatusOK, code, p)
		require.Equal(t, "ok", body, p)
	}

	cancel()
	require.NoError(t, <-done)
	_, err = net.Dial("tcp", s.Addr().String())
	require.Error(t, err, "the listener is closed after Run")
}

func ok(context.Context) error { return nil }

func TestNewRefuses(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer busy.Close()
	for name, tc := range map[string]struct {
		cfg  Config
		want string
	}{
		"no port":       {Config{Addr: "127.0.0.1"}, "parse address"},
		"empty":         {Config{Addr: ""}, "parse address"},
		"no host":       {Config{Addr: ":10350"}, "host and port are both required"},
		"bad host":      {Config{Addr: "no.such.host.invalid:1"}, "listen on"},
		"busy":          {Config{Addr: busy.Addr().String()}, "address already in use"},
		"unnamed check": {Config{Addr: "127.0.0.1:0", Ready: []Check{{Func: ok}}}, `check "": the name must be`},
		"path in name":  {Config{Addr: "127.0.0.1:0", Live: []Check{{Name: "a/b", Func: ok}}}, `check "a/b": the name must be`},
		"no func":       {Config{Addr: "127.0.0.1:0", Ready: []Check{{Name: "store"}}}, `check "store" has no func`},
		"twice":         {Config{Addr: "127.0.0.1:0", Ready: []Check{{Name: "store", Func: ok}, {Name: "store", Func: ok}}}, `check "store" is given twice`},
	} {
		t.Run(name, func(t *testing.T) {
			s, err := New(tc.cfg)
			require.ErrorContains(t, err, tc.want)
			require.Nil(t, s)
		})
	}
}

// TestPprof serves Go's profiles only when asked: /debug/pprof/ is
// unknown by default and answers with a heap profile under Pprof.
func TestPprof(t *testing.T) {
	for _, on := range []bool{false, true} {
		s, err := New(Config{Addr: "127.0.0.1:0", Pprof: on})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		code, body := get(t, "http://"+s.Addr().String()+"/debug/pprof/heap?debug=1")
		if on {
			require.Equal(t, http.StatusOK, code)
			require.Contains(t, body, "heap profile:")
		} else {
			require.Equal(t, http.StatusNotFound, code)
		}
		cancel()
		require.NoError(t, <-done)
	}
}
