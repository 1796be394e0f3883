package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// TokenEnv is the environment variable `edgecore join` reads the join
// token from, so that it is not in the process's arguments (ps).
const TokenEnv = "TETHER_JOIN_TOKEN"

// maxTokenFile bounds what is read from --token-file: a token is about
// 100 bytes; a larger file is not a token file.
const maxTokenFile = 4 << 10

// joinToken returns the join token given exactly one way: --token,
// --token-file or the environment (getenv(TokenEnv)). Two ways are
// refused, naming both, rather than one silently winning.
func joinToken(f joinFlags, getenv func(string) string) (string, error) {
	env := getenv(TokenEnv)
	var ways []string
	if f.token != "" {
		ways = append(ways, "--token")
	}
	if f.tokenFile != "" {
		ways = append(ways, "--token-file")
	}
	if env != "" {
		ways = append(ways, TokenEnv)
	}
	switch {
	case len(ways) == 0:
		return "", fmt.Errorf("a join token is required: --token-file, %s or --token", TokenEnv)
	case len(ways) > 1:
		return "", fmt.Errorf("the join token is given %s: give it one way", strings.Join(ways, " and "))
	case f.tokenFile != "":
		return readTokenFile(f.tokenFile)
	case env != "":
		return strings.TrimSpace(env), nil
	}
	return f.token, nil
}

// readTokenFile reads a token file, which must be a regular file no one
// but its owner can read (as ssh insists for private keys): a token
// others can read lets them join as this node.
func readTokenFile(path string) (string, error) {
	fh, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("open token file: %w", err)
	}
	defer fh.Close()
	fi, err := fh.Stat()
	if err != nil {
		return "", fmt.Errorf("stat token file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("token file %s is not a regular file (%s)", path, fi.Mode().Type())
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("token file %s has mode %04o: it must not be readable or writable by group or others (chmod 600 %s)", path, perm, path)
	}
	b, err := io.ReadAll(io.LimitReader(fh, maxTokenFile+1))
	if err != nil {
		return "", fmt.Errorf("read token file: %w", err)
	}
	if len(b) > maxTokenFile {
		return "", fmt.Errorf("token file %s is larger than %d bytes: not a token", path, maxTokenFile)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	return tok, nil
}

// removeTokenFile deletes a used token file; one already gone is fine.
func removeTokenFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove token file: %w", err)
	}
	return nil
}
