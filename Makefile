# Tether build, test and run targets. `make test` is the one test command:
# on a fresh Debian machine with Go and gcc it builds everything the tests
# need (kube-apiserver, etcd, golangci-lint; containerd, runc and the CNI
# plugins from apt, as root) and runs vet, lint and the tests.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
GO ?= go
OUTPUT := _output
BIN := $(OUTPUT)/bin
TOOLS := $(OUTPUT)/tools/bin
GOLANGCI_VERSION := v2.15.0
GOLANGCI := $(TOOLS)/golangci-lint-$(GOLANGCI_VERSION)
CRICTL_VERSION := v1.37.0
CRICTL := $(TOOLS)/crictl-$(CRICTL_VERSION)
TESTFLAGS ?= -race -count=1 -timeout 30m

.PHONY: all build run test vet lint testbin kubectl tools check-env fuzz bench chaos clean runtime-deps guest

all: build

## build: the cloudcore and edgecore binaries (and the quickstart, devcluster) into _output/bin
build: check-env
	@mkdir -p $(BIN)
	@start=$$(date +%s); echo ">> build: cloudcore, edgecore, quickstart, devcluster (go build)"; \
	  $(GO) build -o $(BIN)/ ./cloudcore/cmd/... ./edgecore/cmd/... ./tests/cmd/...; \
	  echo ">> build: done in $$(( $$(date +%s) - start ))s"

## run: the quickstart (tests/cmd/quickstart, as root): control plane, CloudCore, a private
## containerd, one joined EdgeCore, a pod and a VM; it stays up until Ctrl-C, which stops it all
run: build testbin kubectl runtime-deps guest
	$(BIN)/quickstart

## test: vet, lint and every test (race detector on), against a real control plane
test: check-env testbin kubectl runtime-deps guest $(CRICTL) vet lint
	$(GO) test $(TESTFLAGS) ./...

vet: check-env
	$(GO) vet ./...

# Another golangci-lint on the machine (a developer's, another clone's)
# must not fail this one: it waits for nothing and shares no state.
lint: $(GOLANGCI)
	$(GOLANGCI) run --allow-parallel-runners ./...

## testbin: kube-apiserver, kube-controller-manager and etcd built from Go modules into _output/testbin
testbin: check-env
	bash build/testbin/build.sh

## kubectl: kubectl of the API server's version into _output/bin (the quickstart's test runs it)
kubectl: check-env
	bash build/testbin/build.sh kubectl

## runtime-deps: containerd, runc, the CNI plugins, busybox-static (and iproute2, and systemd for systemd-analyze), QEMU and the guest kernel from apt, when missing
# Idempotent and silent when everything is present. The tests start containerd
# themselves (tests/containerd), so a system containerd the package may have
# started is stopped and disabled. See docs/testing.md. qemu-system-x86,
# qemu-utils and linux-image-cloud-amd64 are for the VM tests (docs/runtime.md, "QEMU").
RUNTIME_PKGS := containerd runc containernetworking-plugins busybox-static iproute2 systemd \
	qemu-system-x86 qemu-utils linux-image-cloud-amd64
runtime-deps:
	@missing=""; for p in $(RUNTIME_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  [ "$$(id -u)" = 0 ] || { echo "error: installing$$missing needs root (apt-get)" >&2; exit 1; }; \
	  start=$$(date +%s); echo ">> runtime-deps: installing$$missing (apt-get)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  log=$$(mktemp); \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; } >$$log 2>&1 \
	    || { cat $$log >&2; rm -f $$log; echo "error: apt-get install$$missing failed" >&2; exit 1; }; \
	  rm -f $$log; \
	  if command -v systemctl >/dev/null && systemctl is-active -q containerd 2>/dev/null; then \
	    systemctl stop containerd; systemctl disable -q containerd; \
	  fi; \
	  echo ">> runtime-deps: installed$$missing in $$(( $$(date +%s) - start ))s"; \
	fi

## guest: the VM tests' guest (build/guest) into _output/guest; cached by content, about 1 s cold
guest: check-env runtime-deps
	@start=$$(date +%s); $(GO) run ./build/guest/cmd/mkguest -out $(OUTPUT)/guest >/dev/null; \
	  echo ">> guest: _output/guest ready in $$(( $$(date +%s) - start ))s"

tools: $(GOLANGCI) $(CRICTL)

# crictl drives the standalone CRI shim in edgecore/cmd/edgecore's tests.
$(CRICTL):
	@echo ">> installing crictl $(CRICTL_VERSION) (go install)"
	@mkdir -p $(TOOLS)
	GOBIN=$(abspath $(TOOLS))/.tmp-crictl $(GO) install sigs.k8s.io/cri-tools/cmd/crictl@$(CRICTL_VERSION)
	mv $(TOOLS)/.tmp-crictl/crictl $@
	rm -rf $(TOOLS)/.tmp-crictl

$(GOLANGCI):
	@echo ">> installing golangci-lint $(GOLANGCI_VERSION) (go install, a few minutes the first time)"
	@mkdir -p $(TOOLS)
	GOBIN=$(abspath $(TOOLS))/.tmp $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_VERSION)
	mv $(TOOLS)/.tmp/golangci-lint $@
	rm -rf $(TOOLS)/.tmp

check-env:
	@command -v $(GO) >/dev/null || { echo "error: go is not installed (need Go 1.26+)" >&2; exit 1; }
	@command -v gcc >/dev/null || { echo "error: gcc is not installed (cgo: SQLite and the race detector); apt-get install gcc" >&2; exit 1; }

## fuzz: run every fuzz target for FUZZTIME each (default 30s)
FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo ">> $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

## chaos: the full chaos test (two minutes per transport; make test runs the
## one-minute form, TETHER_CHAOS_FULL=1 make test the full one). docs/testing.md
chaos: check-env testbin
	$(GO) test $(TESTFLAGS) ./tests/chaos -chaos.full

## bench: every benchmark, 5 runs each, into _output/bench.txt
bench: testbin
	$(GO) test -run '^$$' -bench . -count 5 ./... | tee $(OUTPUT)/bench.txt

clean:
	rm -rf $(BIN)
