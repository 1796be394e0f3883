#!/usr/bin/env bash
# Builds the real kube-apiserver, kube-controller-manager and etcd that
# Tether's integration tests run (tests/controlplane) into
# <repo>/_output/testbin.
#
# All three are compiled from their Go modules at the versions pinned in
# build/testbin/go.mod, so a fresh machine needs only Go and the module proxy:
# no prebuilt binary is downloaded. The build is skipped when
# _output/testbin/.stamp matches the sha256 of this module's inputs and all
# binaries exist.
#
# Usage (from anywhere, normally via `make testbin`):
#   bash build/testbin/build.sh
# Set TESTBIN_FORCE=1 to rebuild even when the stamp matches.
#
#   bash build/testbin/build.sh kubectl      (`make kubectl`)
# builds kubectl from the k8s.io/kubectl that the pinned k8s.io/kubernetes
# requires into <repo>/_output/bin/kubectl instead, with its own stamp
# (_output/bin/.kubectl.stamp): the kubectl `make run` prints, of the API
# server's own version (Debian's is v1.20). It shares most packages with
# kube-apiserver, so after `make testbin` it is an incremental build.
set -euo pipefail

log() { printf 'testbin: %s\n' "$*"; }
die() { printf 'testbin: error: %s\n' "$*" >&2; exit 1; }

if ! command -v go >/dev/null 2>&1; then
	die "go is not on PATH; install Go (build/testbin/go.mod names the version) and retry"
fi

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"
what="${1:-testbin}"
case "${what}" in
testbin)
	out_dir="${repo_root}/_output/testbin"
	stamp_file="${out_dir}/.stamp"
	;;
kubectl)
	out_dir="${repo_root}/_output/bin"
	stamp_file="${out_dir}/.kubectl.stamp"
	;;
*) die "unknown target ${what} (want testbin or kubectl)" ;;
esac

sha256() {
	if command -v sha256sum >/dev/null 2>&1; then
		sha256sum | cut -d' ' -f1
	elif command -v shasum >/dev/null 2>&1; then
		shasum -a 256 | cut -d' ' -f1
	else
		die "neither sha256sum nor shasum is on PATH"
	fi
}

cd "${script_dir}"

# The stamp covers everything that decides what gets built: the pinned
# versions (go.mod, go.sum), this script (flags) and the main packages.
if [[ "${what}" == kubectl ]]; then
	want_stamp="$(cat go.mod go.sum build.sh cmd/kubectl/main.go | sha256)"
	bins=(kubectl)
else
	want_stamp="$(cat go.mod go.sum build.sh cmd/kube-apiserver/main.go cmd/kube-controller-manager/main.go cmd/etcd/main.go | sha256)"
	bins=(kube-apiserver kube-controller-manager etcd)
fi

up_to_date=1
for b in "${bins[@]}"; do
	[[ -x "${out_dir}/${b}" ]] || up_to_date=0
done
if [[ "${TESTBIN_FORCE:-0}" != 1 && "${up_to_date}" == 1 &&
	-f "${stamp_file}" && "$(cat "${stamp_file}")" == "${want_stamp}" ]]; then
	log "up to date in ${out_dir} (stamp ${want_stamp:0:12}); nothing to do"
	exit 0
fi

mkdir -p "${out_dir}"
rm -f "${stamp_file}"

# Build this module on its own, whatever go.work or flags the caller has, and
# without VCS stamping: the binaries' versions come from -ldflags below.
export GOWORK=off
export CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false -trimpath"

log "using $(go version)"
log "resolving pinned versions (downloads module metadata on a fresh machine)"
k8s_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
etcd_version="$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)"
[[ "${k8s_version}" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] ||
	die "k8s.io/kubernetes version ${k8s_version} is not a release version"
k8s_major="${BASH_REMATCH[1]}"
k8s_minor="${BASH_REMATCH[2]}"
log "kube-apiserver, kube-controller-manager and kubectl ${k8s_version}, etcd ${etcd_version}"

# kube-apiserver and kube-controller-manager report their version from
# component-base (and client-go for their user agent); without these they
# would claim v0.0.0-master.
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	k8s_ldflags+=" -X ${pkg}.gitVersion=${k8s_version}"
	k8s_ldflags+=" -X ${pkg}.gitMajor=${k8s_major}"
	k8s_ldflags+=" -X ${pkg}.gitMinor=${k8s_minor}"
	k8s_ldflags+=" -X ${pkg}.gitTreeState=clean"
done
etcd_ldflags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${etcd_version}"

# build NAME LDFLAGS compiles ./cmd/NAME into a temporary file and moves it
# into place only when the build succeeded.
build() {
	local name="$1" ldflags="$2" start
	start="${SECONDS}"
	log "building ${name} (modules are downloaded on first use; kube-apiserver takes minutes when cold)"
	go build -ldflags "${ldflags}" -o "${out_dir}/.${name}.tmp" "./cmd/${name}"
	mv -f "${out_dir}/.${name}.tmp" "${out_dir}/${name}"
	log "built ${out_dir}/${name} in $((SECONDS - start))s"
}

if [[ "${what}" == kubectl ]]; then
	build kubectl "${k8s_ldflags}"
	"${out_dir}/kubectl" version --client | sed 's/^/testbin:   /'
	printf '%s\n' "${want_stamp}" >"${stamp_file}"
	log "done; wrote ${stamp_file}"
	exit 0
fi

build etcd "${etcd_ldflags}"
build kube-apiserver "${k8s_ldflags}"
# Most of kube-controller-manager's packages are shared with kube-apiserver
# and in the build cache by now: it adds about 2 minutes to a cold build on
# a busy 2-core machine (128 s measured), not a second cold build.
build kube-controller-manager "${k8s_ldflags}"

log "checking versions"
"${out_dir}/etcd" --version | sed -n '1p' | sed 's/^/testbin:   /'
"${out_dir}/kube-apiserver" --version | sed 's/^/testbin:   /'
"${out_dir}/kube-controller-manager" --version | sed 's/^/testbin:   /'

printf '%s\n' "${want_stamp}" >"${stamp_file}"
log "done; wrote ${stamp_file}"
