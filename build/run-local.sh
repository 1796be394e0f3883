#!/usr/bin/env bash
# Runs a CloudCore and one EdgeCore on this machine, connected over the
# tunnel with development certificates. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=_output/bin
PKI=_output/dev-pki
PORT=${TETHER_PORT:-10000}
[[ -f $PKI/ca.crt ]] || "$BIN/cloudcore" dev-pki --dir "$PKI" --node edge-1
"$BIN/cloudcore" --quic-addr "127.0.0.1:$PORT" --websocket-addr "127.0.0.1:$PORT" \
  --tls-cert "$PKI/server.crt" --tls-key "$PKI/server.key" --client-ca "$PKI/ca.crt" &
CLOUD=$!
trap 'kill $CLOUD $EDGE 2>/dev/null; wait' EXIT INT TERM
sleep 0.5
"$BIN/edgecore" --cloud "127.0.0.1:$PORT" --node edge-1 \
  --tls-cert "$PKI/edge-1.crt" --tls-key "$PKI/edge-1.key" --ca "$PKI/ca.crt" &
EDGE=$!
wait -n
