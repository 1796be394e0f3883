#!/usr/bin/env bash
# Runs on this machine the whole onboarding and sync path:
#   1. a development control plane (real etcd + kube-apiserver from _output/testbin),
#   2. CloudCore watching it (it creates the cluster CA Secret on first start),
#   3. `cloudcore admin allow edge-1`: whitelists the node and prints a join token,
#   4. `edgecore join`: the node makes its key, checks the CA, gets its certificate,
#   5. EdgeCore, connected over QUIC: it registers its Node and syncs what is bound to it.
# Ctrl-C stops everything. State lives in _output/dev.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=_output/bin
DEV=_output/dev
PORT=${TETHER_PORT:-10000}
JOIN_PORT=${TETHER_JOIN_PORT:-10002}
NODE=${TETHER_NODE:-edge-1}
mkdir -p "$DEV"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT INT TERM

rm -f "$DEV/kubeconfig"
"$BIN/devcluster" --kubeconfig-out "$DEV/kubeconfig" &
pids+=($!)
for _ in $(seq 1 120); do [[ -s $DEV/kubeconfig ]] && break; sleep 0.5; done
[[ -s $DEV/kubeconfig ]] || { echo "run-local: the development control plane did not start" >&2; exit 1; }

"$BIN/cloudcore" --kubeconfig "$DEV/kubeconfig" --quic-addr "127.0.0.1:$PORT" --websocket-addr "127.0.0.1:$PORT" \
  --join-addr "127.0.0.1:$JOIN_PORT" &
pids+=($!)

TOKEN=""
for _ in $(seq 1 60); do
  TOKEN=$("$BIN/cloudcore" admin allow "$NODE" --kubeconfig "$DEV/kubeconfig" 2>/dev/null) && break
  sleep 0.5
done
[[ -n $TOKEN ]] || { echo "run-local: cloudcore admin allow failed" >&2; exit 1; }
echo "run-local: join token for $NODE issued"

joined=""
for _ in $(seq 1 60); do
  if TETHER_JOIN_TOKEN="$TOKEN" "$BIN/edgecore" join --cloud "127.0.0.1:$JOIN_PORT" --node "$NODE" --data-dir "$DEV/$NODE" --force; then
    joined=1; break
  fi
  # Only a cloud that is not listening yet is worth retrying; the token is single-use.
  TOKEN=$("$BIN/cloudcore" admin allow "$NODE" --kubeconfig "$DEV/kubeconfig" 2>/dev/null)
  sleep 0.5
done
[[ -n $joined ]] || { echo "run-local: edgecore join failed" >&2; exit 1; }

"$BIN/edgecore" --cloud "127.0.0.1:$PORT" --node "$NODE" --data-dir "$DEV/$NODE" &
pids+=($!)
echo "run-local: running; KUBECONFIG=$DEV/kubeconfig reaches the control plane (cloudcore admin list --kubeconfig $DEV/kubeconfig)"
wait -n
