// Package opsprobe reads a daemon's operations endpoint (common/serve) in
// tests: one request on a fresh connection, so that a closed endpoint is
// seen as an error at once. It is for tests only.
package opsprobe

import (
	"fmt"
	"io"
	"net/http"
	"time"
)

// Get fetches url and returns its status code and body.
func Get(url string) (int, string, error) {
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", fmt.Errorf("get %s: %w", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, "", fmt.Errorf("read %s: %w", url, err)
	}
	return resp.StatusCode, string(b), nil
}
