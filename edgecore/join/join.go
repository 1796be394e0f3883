// Package join gives an edge node its identity: with a join token from the
// operator it makes a private key on the node, downloads the cluster CA and
// checks it against the hash in the token, asks CloudCore to sign a
// certificate request, checks what comes back and stores node.pem (key and
// certificate in one file, replaced atomically) and ca.crt. It also builds and checks renewals of that certificate.
//
// It must never send the private key anywhere, never send the token to a
// server it has not authenticated with the token-verified CA, and never
// overwrite an existing identity unless told to. It does not carry renewal
// requests over a session: the caller does.
package join

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"
	"unicode"

	joinapi "github.com/tetheredge/tether/common/join"
)

// Limits on what the cloud may send before it is trusted.
const (
	// MaxCABytes bounds the CA download.
	MaxCABytes = 64 << 10
	// MaxResponseBytes bounds the join response.
	MaxResponseBytes = 1 << 20
	// maxReason bounds how much of a refusal reason is shown.
	maxReason = 512
)

// Steps is the number of steps Join reports through Config.Progress.
const Steps = 6

// ErrAlreadyJoined means the directory already holds a node key and
// Config.Force is not set.
var ErrAlreadyJoined = errors.New("join: node key already exists")

// ErrTunnelPort is wrapped when the server at the cloud address asked for
// a client certificate, as CloudCore's tunnel does and its join endpoint
// never does: the address is likely the tunnel's port.
var ErrTunnelPort = errors.New("join: the server asked for a client certificate, which CloudCore's join endpoint never does: " +
	"this is likely its tunnel port (10000); give --cloud CloudCore's join endpoint (its --join-addr, port 10002 by default)")

// Config says how to join. Join fills defaults into a copy.
type Config struct {
	// Cloud is host:port of CloudCore's join endpoint (HTTPS). The host is
	// also the name the cloud's certificate must carry. Required.
	Cloud string
	// Token is the join token from the operator (tj1.<id>.<secret>.<hash>).
	// Required.
	Token string
	// Node is this node's name; the certificate must be issued for it.
	// Required.
	Node string
	// Dir receives node.pem and ca.crt; it is created 0700 when missing.
	// Required.
	Dir string
	// Force replaces an identity already in Dir. Default false: Join
	// refuses, before it contacts the cloud, when Dir holds a node.pem
	// (or the node.key of an earlier version).
	Force bool
	// HTTPClient supplies dialing, proxy and timeout settings. Its
	// Transport must be nil or an *http.Transport; Join clones it and
	// always replaces its TLS settings with its own. Default: a client
	// built from http.DefaultTransport's settings.
	HTTPClient *http.Client
	// Timeout bounds each of the two requests. Default 30s.
	Timeout time.Duration
	// Progress, when set, is called before each step with a short line
	// for a person, such as "[1/6] checking the token". Default: nothing.
	Progress func(step string)
	// Logger receives debug detail. Default: discard.
	Logger *slog.Logger
}

// Result describes the stored identity.
type Result struct {
	// KeyPath, CertPath and CAPath are the files written; KeyPath and
	// CertPath are both IdentityFile, which holds the key and the
	// certificate together (tls.LoadX509KeyPair reads it as both).
	KeyPath, CertPath, CAPath string
	// Serial is the certificate's serial number, lowercase hex.
	Serial string
	// NotAfter is when the certificate expires.
	NotAfter time.Time
}

// RefusedError is the cloud's refusal of a join.
type RefusedError struct {
	// Status is the HTTP status code.
	Status int
	// Reason is the cloud's explanation, made printable.
	Reason string
}

func (e *RefusedError) Error() string {
	return "the cloud refused the join: " + e.Reason
}

// explainedError shows a sentence written for the operator while still
// matching a sentinel with errors.Is.
type explainedError struct {
	msg string
	err error
}

func (e *explainedError) Error() string { return e.msg }
func (e *explainedError) Unwrap() error { return e.err }

func (cfg Config) withDefaults() (Config, error) {
	switch {
	case cfg.Cloud == "":
		return cfg, errors.New("join config: the cloud address is required")
	case cfg.Token == "":
		return cfg, errors.New("join config: the token is required")
	case cfg.Node == "":
		return cfg, errors.New("join config: the node name is required")
	case cfg.Dir == "":
		return cfg, errors.New("join config: the directory is required")
	}
	if strings.Contains(cfg.Cloud, "://") {
		return cfg, fmt.Errorf("join config: cloud address %q: want host:port without a scheme", cfg.Cloud)
	}
	if host, port, err := net.SplitHostPort(cfg.Cloud); err != nil || host == "" || port == "" {
		return cfg, fmt.Errorf("join config: cloud address %q: want host:port", cfg.Cloud)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.Progress == nil {
		cfg.Progress = func(string) {}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg, nil
}

// Join gives this node an identity; see the package comment. Nothing is
// stored unless every check passed.
func Join(ctx context.Context, cfg Config) (Result, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return Result{}, err
	}
	host, _, _ := net.SplitHostPort(cfg.Cloud) // checked by withDefaults
	j := &joiner{cfg: cfg, host: host, logger: cfg.Logger.With("cloud", cfg.Cloud, "node", cfg.Node)}
	return j.run(ctx)
}

type joiner struct {
	cfg    Config
	host   string
	logger *slog.Logger
	step   int
}

func (j *joiner) progress(format string, args ...any) {
	j.step++
	line := fmt.Sprintf("[%d/%d] ", j.step, Steps) + fmt.Sprintf(format, args...)
	j.logger.Debug("join step", "step", j.step, "line", line)
	j.cfg.Progress(line)
}

func (j *joiner) run(ctx context.Context) (Result, error) {
	// Refuse before the token is used: a single-use token spent on a node
	// that then cannot store its certificate would be lost.
	if err := j.checkNoIdentity(); err != nil {
		return Result{}, err
	}

	j.progress("checking the token")
	tok, err := joinapi.Parse(j.cfg.Token)
	if err != nil {
		return Result{}, fmt.Errorf("token is malformed: %w", err)
	}

	j.progress("generating the node key (ECDSA P-256; it never leaves this node)")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Result{}, fmt.Errorf("generate the node key: %w", err)
	}

	j.progress("downloading the cluster CA from %s and checking it against the token", j.cfg.Cloud)
	ca, err := j.fetchCA(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("download the cluster CA from %s: %w", j.cfg.Cloud, err)
	}
	if err := verifyCA(tok, ca); err != nil {
		return Result{}, err
	}

	j.progress("asking the cloud to sign a certificate for node %q", j.cfg.Node)
	csr, err := newCSR(key, j.cfg.Node)
	if err != nil {
		return Result{}, fmt.Errorf("build the certificate request: %w", err)
	}
	certPEM, err := j.requestCert(ctx, ca, joinapi.Request{Node: j.cfg.Node, Token: j.cfg.Token, CSR: string(csr)})
	if err != nil {
		return Result{}, err
	}

	j.progress("checking the issued certificate")
	leaf, err := ValidateIssued(certPEM, ca, j.cfg.Node, key.Public())
	if err != nil {
		return Result{}, fmt.Errorf("check the issued certificate: %w", err)
	}

	j.progress("writing %s and %s to %s", IdentityFile, CAFile, j.cfg.Dir)
	if err := j.checkNoIdentity(); err != nil {
		return Result{}, err
	}
	if err := Store(j.cfg.Dir, key, leaf, ca); err != nil {
		return Result{}, fmt.Errorf("store the node identity in %s: %w", j.cfg.Dir, err)
	}
	res := Result{
		KeyPath:  filepath.Join(j.cfg.Dir, IdentityFile),
		CertPath: filepath.Join(j.cfg.Dir, IdentityFile),
		CAPath:   filepath.Join(j.cfg.Dir, CAFile),
		Serial:   leaf.SerialNumber.Text(16),
		NotAfter: leaf.NotAfter,
	}
	j.logger.Info("node joined", "serial", res.Serial, "not_after", res.NotAfter)
	return res, nil
}

func (j *joiner) checkNoIdentity() error {
	if j.cfg.Force {
		return nil
	}
	for _, name := range []string{IdentityFile, KeyFile} {
		path := filepath.Join(j.cfg.Dir, name)
		_, err := os.Lstat(path)
		switch {
		case err == nil:
			return fmt.Errorf("%w: %s already exists, so this node has already joined; pass --force to replace its identity", ErrAlreadyJoined, path)
		case !errors.Is(err, fs.ErrNotExist):
			return fmt.Errorf("check for an existing node identity: %w", err)
		}
	}
	return nil
}

func verifyCA(tok joinapi.Token, ca *x509.Certificate) error {
	err := tok.VerifyCA(ca)
	if err == nil {
		return nil
	}
	if got := joinapi.CAHash(ca); got != tok.CAHash {
		return &explainedError{
			msg: fmt.Sprintf("the cluster CA does not match the token (got sha256:%s, expected sha256:%s): "+
				"you may be talking to the wrong server or an attacker; check --cloud and the token", got, tok.CAHash),
			err: err,
		}
	}
	return fmt.Errorf("check the cluster CA: %w", err)
}

// httpClient returns a client whose transport is a fresh clone with the
// given TLS settings. Each request gets its own transport so that the
// connection opened without verification for the CA download can never be
// reused for the join.
func (j *joiner) httpClient(tlsCfg *tls.Config) (*http.Client, *http.Transport, error) {
	base := j.cfg.HTTPClient
	if base == nil {
		base = &http.Client{}
	}
	var tr *http.Transport
	switch rt := base.Transport.(type) {
	case nil:
		def, ok := http.DefaultTransport.(*http.Transport)
		if !ok {
			return nil, nil, errors.New("http.DefaultTransport is not an *http.Transport")
		}
		tr = def.Clone()
	case *http.Transport:
		tr = rt.Clone()
	default:
		return nil, nil, fmt.Errorf("HTTPClient.Transport is a %T; want *http.Transport", rt)
	}
	tr.TLSClientConfig = tlsCfg
	tr.ForceAttemptHTTP2 = true
	client := &http.Client{
		Transport: tr,
		Timeout:   base.Timeout,
		// Never follow a redirect: the token must go to this host only.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return client, tr, nil
}

func (j *joiner) url(path string) string {
	return "https://" + j.cfg.Cloud + path
}

// fetchCA downloads the CA without authenticating the server; the caller
// must check it against the token before trusting it.
func (j *joiner) fetchCA(ctx context.Context) (*x509.Certificate, error) {
	// The join endpoint never asks a client certificate (a joining node
	// has none); CloudCore's tunnel always does: a server that asks is
	// the tunnel's port given for the join's, a cheap and sure sign that
	// turns its refusal ("tls: bad certificate") into what to do.
	var askedCert atomic.Bool
	client, tr, err := j.httpClient(&tls.Config{
		// Not trusted yet on purpose: nothing secret is sent, and the CA
		// that comes back is accepted only if it matches the token's hash.
		InsecureSkipVerify: true,
		MinVersion:         tls.VersionTLS13,
		ServerName:         j.host,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			askedCert.Store(true)
			return &tls.Certificate{}, nil // none
		},
	})
	if err != nil {
		return nil, err
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, j.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, j.url(joinapi.PathCA), nil)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		if askedCert.Load() {
			return nil, fmt.Errorf("%w: %w", ErrTunnelPort, err)
		}
		return nil, err
	}
	defer resp.Body.Close()
	body, err := readLimited(resp.Body, MaxCABytes)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the server answered %s", resp.Status)
	}
	j.logger.Debug("cluster CA downloaded", "bytes", len(body))
	return parseOneCert(body)
}

// requestCert sends the join and returns the certificate PEM. The server
// must prove it holds a certificate from ca for j.host.
func (j *joiner) requestCert(ctx context.Context, ca *x509.Certificate, jr joinapi.Request) ([]byte, error) {
	fail := func(err error) ([]byte, error) {
		return nil, fmt.Errorf("send the join request to %s: %w", j.cfg.Cloud, err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	client, tr, err := j.httpClient(&tls.Config{
		RootCAs:    roots,
		MinVersion: tls.VersionTLS13,
		ServerName: j.host,
	})
	if err != nil {
		return fail(err)
	}
	defer tr.CloseIdleConnections()
	body, err := json.Marshal(jr)
	if err != nil {
		return fail(fmt.Errorf("encode request: %w", err))
	}
	ctx, cancel := context.WithTimeout(ctx, j.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, j.url(joinapi.PathJoin), bytes.NewReader(body))
	if err != nil {
		return fail(fmt.Errorf("build request: %w", err))
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return fail(explainTLS(err, j.host))
	}
	defer resp.Body.Close()
	raw, err := readLimited(resp.Body, MaxResponseBytes)
	if err != nil {
		return fail(err)
	}
	var out joinapi.Response
	decodeErr := json.Unmarshal(raw, &out)
	if resp.StatusCode != http.StatusOK {
		reason := printable(out.Error)
		if decodeErr != nil || reason == "" {
			reason = resp.Status
		}
		return nil, &RefusedError{Status: resp.StatusCode, Reason: reason}
	}
	if decodeErr != nil {
		return fail(fmt.Errorf("decode the response: %w", decodeErr))
	}
	if out.Certificate == "" {
		return fail(errors.New("the response holds no certificate"))
	}
	return []byte(out.Certificate), nil
}

// explainTLS turns a failed verification of the cloud's certificate into a
// sentence for the operator.
func explainTLS(err error, host string) error {
	var unknown x509.UnknownAuthorityError
	if errors.As(err, &unknown) {
		return fmt.Errorf("the server's TLS certificate is not signed by the cluster CA named in the token "+
			"(a different server or a man in the middle): %w", err)
	}
	var badHost x509.HostnameError
	if errors.As(err, &badHost) {
		return fmt.Errorf("the server's TLS certificate is not valid for %q; use the address the cloud's certificate names in --cloud: %w", host, err)
	}
	var invalid x509.CertificateInvalidError
	if errors.As(err, &invalid) {
		return fmt.Errorf("the server's TLS certificate is not valid (check this node's clock): %w", err)
	}
	return err
}

// readLimited reads all of r, failing when it holds more than limit bytes.
func readLimited(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read the response: %w", err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("the response is larger than %d bytes", limit)
	}
	return b, nil
}

// parseOneCert decodes PEM that must hold exactly one CERTIFICATE block and
// nothing else but white space.
func parseOneCert(b []byte) (*x509.Certificate, error) {
	block, rest := pem.Decode(b)
	if block == nil {
		return nil, errors.New("no PEM certificate found")
	}
	if block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("PEM block is a %q, want CERTIFICATE", block.Type)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("want exactly one PEM certificate, found more data after it")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	return cert, nil
}

// printable keeps a reason from the network safe to print on a terminal.
func printable(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return -1
	}, strings.TrimSpace(s))
	if r := []rune(s); len(r) > maxReason {
		s = string(r[:maxReason]) + "…"
	}
	return s
}
