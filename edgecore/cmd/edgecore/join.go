package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/tetheredge/tether/edgecore/join"
)

type joinFlags struct {
	cloud, token, node string
	tokenFile          string
	keepTokenFile      bool
	dataDir            string
	force              bool
	timeout            time.Duration
	logLevel           string
}

// newJoinCommand returns "edgecore join": it gives this node its identity
// with a token from the operator and writes it where edgecore reads it.
func newJoinCommand() *cobra.Command {
	var f joinFlags
	cmd := &cobra.Command{
		Use:   "join",
		Short: "Join this node to a Tether cluster with a token from the operator",
		Long: "Join makes this node's private key (it never leaves the node), checks the cluster CA\n" +
			"against the hash in the token, has CloudCore sign a certificate and writes\n" +
			join.IdentityFile + " (key and certificate) and " + join.CAFile + " (mode 0600) to --data-dir.",
		Example: "  (umask 077; cat > /root/tether.token)   # paste the token, then Ctrl-D\n" +
			"  edgecore join --cloud cloud.example.com:10002 --token-file /root/tether.token --node edge-1\n" +
			"  " + TokenEnv + "=tj1.… edgecore join --cloud cloud.example.com:10002 --node edge-1",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := runJoin(cmd, f); err != nil {
				return fmt.Errorf("join failed: %w", err)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.cloud, "cloud", "", "host:port of CloudCore's join endpoint (HTTPS); the host must be a name in the cloud's certificate")
	fl.StringVar(&f.token, "token", "", "join token from the operator (tj1.<id>.<secret>.<ca hash>); visible in ps: prefer --token-file or "+TokenEnv)
	fl.StringVar(&f.tokenFile, "token-file", "", "file holding the join token, mode 0600 or stricter; removed after a successful join")
	fl.BoolVar(&f.keepTokenFile, "keep-token-file", false, "keep --token-file after a successful join")
	fl.StringVar(&f.node, "node", "", "this node's name (the one the token was made for)")
	fl.StringVar(&f.dataDir, "data-dir", "/var/lib/tether/edgecore", "directory that receives "+join.IdentityFile+" and "+join.CAFile)
	fl.BoolVar(&f.force, "force", false, "replace an identity already in --data-dir")
	fl.DurationVar(&f.timeout, "timeout", 30*time.Second, "limit on each request to the cloud")
	fl.StringVar(&f.logLevel, "log-level", "warn", "debug, info, warn or error")
	return cmd
}

func runJoin(cmd *cobra.Command, f joinFlags) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.logLevel)); err != nil {
		return fmt.Errorf("log level %q: %w", f.logLevel, err)
	}
	if f.cloud == "" || f.node == "" {
		return errors.New("--cloud and --node are required")
	}
	token, err := joinToken(f, os.Getenv)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	out := cmd.OutOrStdout()
	res, err := join.Join(ctx, join.Config{
		Cloud:   f.cloud,
		Token:   token,
		Node:    f.node,
		Dir:     f.dataDir,
		Force:   f.force,
		Timeout: f.timeout,
		Progress: func(step string) {
			fmt.Fprintln(out, step)
		},
		Logger: slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level})),
	})
	if errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%w; nothing listens at %s: give --cloud CloudCore's join endpoint (its --join-addr, port 10002 by default), "+
			"not its tunnel port 10000, and check that CloudCore runs", err, f.cloud)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "joined: certificate serial %s valid until %s; start edgecore with --data-dir %s\n",
		res.Serial, res.NotAfter.UTC().Format(time.RFC3339), f.dataDir)
	if f.tokenFile != "" && !f.keepTokenFile {
		// The token is spent; a copy left on disk is only a secret to leak.
		if err := removeTokenFile(f.tokenFile); err != nil {
			return fmt.Errorf("joined, but %w", err)
		}
		fmt.Fprintf(out, "removed token file %s\n", f.tokenFile)
	}
	return nil
}
