#!/usr/bin/env bash
# Runs, on this machine: a development control plane (real etcd and
# kube-apiserver from _output/testbin), a CloudCore watching it, and one
# EdgeCore connected over QUIC with development certificates. The edge
# registers its Node; pods bound to it reach its SQLite store in
# _output/dev/edge-1. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=_output/bin
DEV=_output/dev
PKI=$DEV/pki
PORT=${TETHER_PORT:-10000}
mkdir -p "$DEV"
[[ -f $PKI/ca.crt ]] || "$BIN/cloudcore" dev-pki --dir "$PKI" --node edge-1
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT INT TERM
rm -f "$DEV/kubeconfig"
"$BIN/devcluster" --kubeconfig-out "$DEV/kubeconfig" &
pids+=($!)
for _ in $(seq 1 120); do [[ -s $DEV/kubeconfig ]] && break; sleep 0.5; done
[[ -s $DEV/kubeconfig ]] || { echo "run-local: the development control plane did not start" >&2; exit 1; }
"$BIN/cloudcore" --kubeconfig "$DEV/kubeconfig" --quic-addr "127.0.0.1:$PORT" --websocket-addr "127.0.0.1:$PORT" \
  --tls-cert "$PKI/server.crt" --tls-key "$PKI/server.key" --client-ca "$PKI/ca.crt" &
pids+=($!)
sleep 1
"$BIN/edgecore" --cloud "127.0.0.1:$PORT" --node edge-1 --data-dir "$DEV/edge-1" \
  --tls-cert "$PKI/edge-1.crt" --tls-key "$PKI/edge-1.key" --ca "$PKI/ca.crt" &
pids+=($!)
echo "run-local: try: KUBECONFIG=$DEV/kubeconfig kubectl get nodes   (if you have kubectl)"
wait -n
