package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/fleet"
	"github.com/tetheredge/tether/cloudcore/onboard"
)

// adminFlags are the flags every admin subcommand shares.
type adminFlags struct {
	kubeconfig  string
	caNamespace string
	caName      string
}

// adminClients are the API clients an admin subcommand needs.
type adminClients struct {
	kube  kubernetes.Interface
	nodes *edgenode.Client
}

func (f *adminFlags) clients() (*adminClients, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = f.kubeconfig
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if clientcmd.IsEmptyConfig(err) {
		// client-go's own message suggests KUBERNETES_MASTER, which
		// nothing here reads.
		return nil, errors.New("no kubeconfig found (none named by KUBECONFIG, none in ~/.kube/config, and not in a pod): " +
			"give --kubeconfig FILE or set KUBECONFIG")
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes dynamic client: %w", err)
	}
	return &adminClients{kube: kube, nodes: edgenode.NewClient(dyn)}, nil
}

// newAdminCommand is the operator's whitelist: which edge nodes may join.
func newAdminCommand() *cobra.Command {
	var f adminFlags
	cmd := &cobra.Command{
		Use:   "admin",
		Short: "Manage the whitelist of edge nodes allowed to join",
		Args:  cobra.NoArgs,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (empty: $KUBECONFIG, ~/.kube/config or in-cluster)")
	pf.StringVar(&f.caNamespace, "ca-namespace", onboard.DefaultCANamespace, "namespace of the Secret holding the cluster CA")
	pf.StringVar(&f.caName, "ca-secret", onboard.DefaultCAName, "name of the Secret holding the cluster CA")
	cmd.AddCommand(newAdminAllowCommand(&f), newAdminListCommand(&f), newAdminDisableCommand(&f), newAdminRemoveCommand(&f))
	return cmd
}

func newAdminAllowCommand(f *adminFlags) *cobra.Command {
	var labels []string
	var ttl time.Duration
	var cloud string
	cmd := &cobra.Command{
		Use:   "allow NODE",
		Short: "Whitelist a node (or re-enable it) and print a new join token",
		Long: "Whitelist a node, or re-enable a disabled one, and print a new one-time join token on stdout.\n" +
			"A token issued earlier for the node stops working. Re-enabling a disabled node withdraws the\n" +
			"certificate it had: it must join again with the new token. The cluster CA is created if there is none.",
		Args: oneNode,
		RunE: func(cmd *cobra.Command, args []string) error {
			node := args[0]
			if err := onboard.ValidateTokenTTL(ttl); err != nil {
				return err
			}
			lbls, err := onboard.ParseLabels(labels)
			if err != nil {
				return err
			}
			c, err := f.clients()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			logger := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelInfo}))
			ca, err := onboard.EnsureCA(ctx, c.kube, f.caNamespace, f.caName, logger)
			if err != nil {
				return err
			}
			tok, _, err := onboard.Allow(ctx, c.nodes, ca.Cert, node, onboard.AllowOptions{Labels: lbls, TokenTTL: ttl})
			if err != nil {
				return err
			}
			// stdout holds the token only, for scripts.
			fmt.Fprintln(cmd.OutOrStdout(), tok.String())
			if cloud == "" {
				cloud = "<cloudcore-host>:10002"
			}
			// The token goes in a file only root reads, never on a command
			// line (ps shows it; edgecore join --token says so too).
			fmt.Fprintf(cmd.ErrOrStderr(), "token valid for %s, once; on the node, keep it in a file only root reads and join with it:\n"+
				"  (umask 077; cat > /root/tether.token)   # paste the token, then Ctrl-D\n"+
				"  edgecore join --cloud %s --token-file /root/tether.token --node %s\n", ttl, cloud, node)
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&labels, "label", nil, "label key=value for the node's Node object (repeatable; replaces the node's labels)")
	cmd.Flags().DurationVar(&ttl, "token-ttl", onboard.DefaultTokenTTL, "how long the join token is valid (at most 720h)")
	cmd.Flags().StringVar(&cloud, "cloud", "", "join address host:port of CloudCore, for the printed hint only")
	return cmd
}

func newAdminListCommand(f *adminFlags) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "Show each edge node's state: allowed, connected (transport, replica, since), last seen, certificate, objects, pods and VMs",
		Long: "list shows each whitelisted node: whether it is allowed; its live session as CloudCore recorded it\n" +
			"(transport@replica, and since when); when its Lease was last renewed; when its certificate expires;\n" +
			"how many objects it held after its last reconcile; and how many pods and VMs bound to it are Running.\n" +
			"-o wide adds the replica, the edge's address as CloudCore sees it (a NAT's or load balancer's if one is in\n" +
			"between), the session, certificate serial, last connection and pending join token; -o json all of it.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != fleet.FormatTable && output != fleet.FormatWide && output != fleet.FormatJSON {
				return fmt.Errorf("--output %q: want wide or json", output)
			}
			c, err := f.clients()
			if err != nil {
				return err
			}
			edges, err := fleet.List(cmd.Context(), c.kube, c.nodes)
			if err != nil {
				return err
			}
			return fleet.Write(cmd.OutOrStdout(), edges, output, time.Now())
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "", "output format: wide or json (default a table)")
	return cmd
}

func newAdminDisableCommand(f *adminFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "disable NODE",
		Short: "Refuse a node's joins, connections and renewals; its live session is closed (allow re-enables it, with a new join)",
		Args:  oneNode,
		RunE: func(cmd *cobra.Command, args []string) error {
			return adminNodeVerb(cmd.Context(), f, func(ctx context.Context, nodes *edgenode.Client) error {
				if _, err := onboard.Disable(ctx, nodes, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s disabled\n", args[0])
				return nil
			})
		},
	}
}

func newAdminRemoveCommand(f *adminFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "remove NODE",
		Short: "Delete a node from the whitelist",
		Args:  oneNode,
		RunE: func(cmd *cobra.Command, args []string) error {
			return adminNodeVerb(cmd.Context(), f, func(ctx context.Context, nodes *edgenode.Client) error {
				if err := onboard.Remove(ctx, nodes, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s removed\n", args[0])
				return nil
			})
		},
	}
}

// oneNode takes exactly one argument, the node's name, and says so
// otherwise (cobra's own message counts arguments without naming them).
func oneNode(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("give one node name: %s, got %d arguments", strings.TrimSuffix(cmd.UseLine(), " [flags]"), len(args))
	}
	return nil
}

func adminNodeVerb(ctx context.Context, f *adminFlags, verb func(context.Context, *edgenode.Client) error) error {
	c, err := f.clients()
	if err != nil {
		return err
	}
	return verb(ctx, c.nodes)
}
