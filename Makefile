# proxy-redirect: `sudo make demo` and `sudo make test` do all the set-up.

SHELL := /bin/bash
CARGO ?= $(shell command -v cargo 2>/dev/null || echo $(HOME)/.cargo/bin/cargo)
BIN := target/release/proxy-redirect
# Debian packages the build, the tests and the benchmarks need.
APT_PACKAGES := clang llvm libelf-dev zlib1g-dev pkg-config linux-libc-dev \
	clang-format iproute2 iptables nftables curl python3 bpftool tcpdump iperf3 haproxy ethtool \
	squid nginx dnsmasq-base bind9-dnsutils python3-yaml systemd
C_SOURCES := $(wildcard bpf/*.c bpf/lib/*.h include/*.h tests/bench/bpf/*.c)

.PHONY: all deps build test vm-deps vm-test demo bench fmt lint clean

all: build

# Installs, without prompting, those of the Debian packages $(1) that are missing.
define apt_install
@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing >/dev/null; \
	fi
endef

deps:
	$(call apt_install,$(APT_PACKAGES))
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from rustup.rs" >&2; exit 1; }

build: deps
	$(CARGO) build --release --all-targets

# promtool (the metrics tests check /metrics with it), taken out of Debian's
# prometheus package without installing it: installing would start a
# Prometheus server.
PROMTOOL := target/prometheus/usr/bin/promtool

$(PROMTOOL):
	@mkdir -p target/prometheus
	cd target/prometheus && { apt-get download prometheus >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
		dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb

test: build $(PROMTOOL)
	$(CARGO) test --release -- --test-threads=2

# `make vm-test`: the same suite inside a VM on a second kernel (Debian's
# 6.1 LTS; VM_KERNEL=/path/to/vmlinuz picks another), see tests/vm/run.sh.
VM_KERNEL ?=
VM_APT_PACKAGES := qemu-system-x86 busybox-static python3-venv $(if $(VM_KERNEL),,linux-image-amd64)
VIRTME_NG := virtme-ng==1.42
VNG := target/vng/bin/vng

vm-deps: deps
	$(call apt_install,$(VM_APT_PACKAGES),--no-install-recommends)
	@[ -x $(VNG) ] || { echo "Installing $(VIRTME_NG) into target/vng"; \
		rm -rf target/vng && /usr/bin/python3 -m venv target/vng && \
		target/vng/bin/pip install -q --disable-pip-version-check "$(VIRTME_NG)"; }

vm-test: build vm-deps $(PROMTOOL)
	VM_KERNEL=$(VM_KERNEL) CARGO=$(CARGO) VNG=$(VNG) tests/vm/run.sh

demo: build
	$(BIN) demo

# One benchmark per subcommand, each run after the other on a quiet machine.
BENCHES := redirect bypass port_nat tproxy restart

bench: build
	for b in $(BENCHES); do $(CARGO) bench --bench $$b || exit 1; done

fmt:
	$(CARGO) fmt
	clang-format -i $(C_SOURCES)

lint:
	python3 tools/check-imports.py
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings
	clang-format --dry-run --Werror $(C_SOURCES)

clean:
	$(CARGO) clean
