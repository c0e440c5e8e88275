# zgolden: Docker volumes that are instant ZFS clones of a golden snapshot.
# `make help` lists the targets.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Go's own tarball installs to /usr/local/go/bin, which sudo's secure_path (Debian's default)
# leaves out: without this, `sudo make run` and `sudo make test` would not find go.
export PATH := $(PATH):/usr/local/go/bin

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GO      ?= go
BIN     := bin/zgolden
LDFLAGS := -s -w -X main.version=$(VERSION)
# Extra flags for `make run`, such as SERVE_ARGS="--parent tank/zgolden".
SERVE_ARGS ?=
# A count, not a duration: with a duration, Go 1.26's fuzz coordinator can report its own
# end-of-time deadline as a failure, "context deadline exceeded" with no failing input (Go issue
# 75804, fixed in Go 1.27; CI hit it once). 500000 runs take about 20 s here.
FUZZTIME ?= 500000x

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

.PHONY: build
build: ## build bin/zgolden (static)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./plugin

.PHONY: run
run: ## as root: install what the plugin needs and run it (ZFS if a pool is imported, else the reflink store)
	@[ "$$(id -u)" = 0 ] || { echo "make run: run as root (sudo make run): the plugin makes block devices and mounts"; exit 1; }
	bash tests/setup/run-deps.sh
	$(MAKE) build
	exec $(BIN) serve $(SERVE_ARGS)

.PHONY: test
test: ## everything: unit, fuzz, host integration, Docker end-to-end, and every ZFS package across the 2.4 and 2.1 guests
	bash tests/setup/host-deps.sh
	$(MAKE) verify build
	@mkdir -p build
	@# Every suite runs even after one fails, so one CI run reports all of them. The two ZFS
	@# guests run side by side and beside the host suites, one vCPU each (tests/vm/run.sh, on
	@# ZGOLDEN_VM_SLOTS): a guest's disks are image files, so it shares no mount, loop device or
	@# Docker engine with the host's tests or the other guest, and the overlap keeps CI inside
	@# its hour. The payload both use is built first, once. Their output goes to
	@# build/test-guest-RELEASE.out and is printed when they end. Last comes the list of what
	@# failed, with the failing tests from each log, so the tail of a CI log names them.
	@# Guest builds take one lock (they share the apt archive cache), so on a cold cache they run
	@# one after the other, and the guest built second starts its suites about 14 minutes later.
	@# The $(ZFS) guest's suites are the longer (a cold run of 2026-12-07: 53 minutes, against 43
	@# for the compat guest's), so the compat guest waits for the $(ZFS) build before its own,
	@# and the shorter suites start last: that run took 78 minutes, where the other order would
	@# have taken about 89 by its own times.
	@# A warm cache makes that wait an instant; a failed build is left to test-vm to report.
	$(MAKE) vm-payload
	@failed=""; \
	export ZGOLDEN_VM_SLOTS=2 ZGOLDEN_VM_SMP=1; \
	$(MAKE) test-vm VM_PREBUILT=1 VM_PKGS="$(CI_VM_PKGS)" >build/test-guest-$(ZFS).out 2>&1 & g1=$$!; \
	{ ZGOLDEN_ZFS=$(ZFS) bash tests/vm/build-guest.sh >/dev/null || true; \
	  $(MAKE) test-vm-compat VM_PREBUILT=1 COMPAT_PKGS="$(CI_COMPAT_PKGS)"; } >build/test-guest-compat.out 2>&1 & g2=$$!; \
	for t in test-unit fuzz test-host; do \
	  $(MAKE) $$t || { echo "make test: $$t failed"; failed="$$failed $$t"; }; \
	done; \
	echo "make test: host suites done; waiting for the ZFS guests"; \
	wait $$g1 || { echo "make test: test-vm failed"; failed="$$failed test-vm"; }; \
	wait $$g2 || { echo "make test: test-vm-compat failed"; failed="$$failed test-vm-compat"; }; \
	cat build/test-guest-$(ZFS).out build/test-guest-compat.out; \
	[ -z "$$failed" ] && exit 0; \
	echo "=================== make test: failed:$$failed"; \
	for f in build/test-unit.log build/test-host.log build/test-vm-*.log; do \
	  [ -f "$$f" ] || continue; \
	  grep -hE -- '--- FAIL|^(vm\|\s+\S+: )?(FAIL\s|panic:)' "$$f" | head -n 20 | sed "s|^|$$f: |" || true; \
	done; \
	exit 1

.PHONY: test-unit
test-unit: ## quick: unit tests with fakes, race detector on, no root needed
	@mkdir -p build
	$(GO) test -race -short -count=1 ./... 2>&1 | tee build/test-unit.log

.PHONY: test-host
test-host: ## as root: real XFS, loop devices, reflink store and the host's Docker engine
	bash tests/setup/docker-engine.sh
	$(MAKE) build
	@mkdir -p build
	rc=0; ZGOLDEN_BIN=$(CURDIR)/$(BIN) $(GO) test -race -count=1 -timeout 40m -v ./... 2>&1 | tee build/test-host.log || rc=$$?; \
	  bash tests/summarize.sh host build/test-host.log && exit $$rc

# The packages whose tests need ZFS (the rest run on the host).
VM_PKGS ?= ./zfsutil ./xfsutil ./zfsstore ./tests/vmsmoke ./tests/e2e ./tests/crash ./tests/stress ./tests/hostile ./tests/plugin ./tests/fleet
# The ZFS release of the test bed (tests/vm/build-guest.sh): 2.1, 2.3 or 2.4. `make test-vm` runs
# every ZFS package on it; `make test-vm-compat` runs the conformance (zfsstore), Docker end-to-end
# and crash suites on each of COMPAT_ZFS. CI (make test) shares every package out between the
# newest and the oldest (CI_VM_PKGS, CI_COMPAT_PKGS below): with 2.3 too, a cold run (three
# guests to build) does not fit CI's 90 minutes. `make test-vm-compat COMPAT_ZFS=2.3` runs the third. The managed plugin's test is left
# out of the compat set to keep CI inside its hour: the plugin carries its own 2.1.11 userland,
# so on 2.1 it only repeats the matched pair, and its real cross-release case (that userland on
# the 2.4 module) runs in the full 2.4 suite. COMPAT_PKGS="... ./tests/plugin" puts it back.
ZFS ?= 2.4
COMPAT_ZFS ?= 2.1
COMPAT_PKGS ?= ./zfsstore ./tests/e2e ./tests/crash
# What CI's two guests run side by side (make test). Both guests are CPU-bound (one vCPU each,
# measured at 99 % of a core), so CI's time is the larger guest's, and the sets are balanced to
# end together inside CI's hour (the runs before, with every compat suite: 3453-3609 s).
# - The stress suite runs in the 2.1 guest, not the 2.4 one: it tests the driver's locks and the
#   store's concurrency, which are the same code on every release, and on 2.1 against the
#   oldest module; 2.4's one-task clone under concurrency stays covered by the conformance
#   suite's concurrent Creates and Creates during a promotion.
# - The fleet suite (two servers over SSH, each side killed mid-transfer and resumed) runs there
#   too: the oldest release is where zfs receive -s with -o origin= and zfs send -t are likeliest
#   to differ, and 2.4 runs the resume at the store level (zfsstore) and in the crash suite.
# - xfsutil and the test bed's smoke test run there as well (about 150 s): XFS on zvols under
#   kernel 6.12 stays covered in the 2.4 guest by every suite that mounts a volume.
# - The Docker end-to-end suite runs in the 2.4 guest only (its 2.1 run took 532 s): on 2.1 the
#   crash suite still drives the ZFS store through Docker's engine (20.10), and the host runs the
#   end-to-end suite on that engine and kernel 6.1 with the reflink store. `make test-vm-compat`
#   runs it on 2.1 (COMPAT_PKGS).
# `make test-vm` runs every package on one release.
CI_VM_PKGS ?= $(filter-out ./tests/stress ./tests/fleet ./xfsutil ./tests/vmsmoke,$(VM_PKGS))
CI_COMPAT_PKGS ?= ./zfsstore ./tests/crash ./tests/stress ./tests/fleet ./xfsutil ./tests/vmsmoke

# The guest cannot debootstrap (no network), so the managed plugin's rootfs (rootfs/build.sh,
# cached) goes in as a tarball; tests/plugin assembles the plugin from it and the guest's zgolden.
.PHONY: test-vm
test-vm: $(if $(VM_PREBUILT),,vm-payload) ## as root: every ZFS package in a qemu guest with the real zfs module of release ZFS (2.1, 2.3, 2.4; default 2.4)
	extra=ZGOLDEN_PLUGIN_ROOTFS_TAR=/payload/extra/plugin-rootfs.tar; \
	  [ -z "$${ZGOLDEN_VM_EXTRA_ENV:-}" ] || extra+=$$'\n'"$$ZGOLDEN_VM_EXTRA_ENV"; \
	  ZGOLDEN_ZFS=$(ZFS) ZGOLDEN_VM_EXTRA_ENV="$$extra" ZGOLDEN_VM_PAYLOAD=$(CURDIR)/build/plugin-rootfs.tar \
	  ZGOLDEN_VM_TIMEOUT=$${ZGOLDEN_VM_TIMEOUT:-4800} ZGOLDEN_VM_TEST_TIMEOUT=$${ZGOLDEN_VM_TEST_TIMEOUT:-40m} \
	  bash tests/vm/run.sh $(VM_PKGS) 2>&1 | tee build/test-vm-$(ZFS).log

# What every guest takes in: the binary, and the managed plugin's rootfs as a tarball. Guests that
# run side by side (make test) have it built once beforehand (VM_PREBUILT=1), since two builds
# into build/ at once would race.
.PHONY: vm-payload
vm-payload: build
	@mkdir -p build
	bash packaging/build-plugin.sh --out build/plugin-vm --tar build/plugin-rootfs.tar

# zfsstore/testdata/golden-zfs-2.4.zgs.gz: a golden made and exported by zgolden in the zfs 2.4
# guest (Debian 13's kernel and xfsprogs), which every release's guest then receives
# (TestReceiveGoldenFromAnotherRelease); CI's 2.1 guest is the oldest kernel that must mount it.
.PHONY: golden-fixture
golden-fixture: ## as root: remake the golden stream fixture in the zfs 2.4 guest
	rm -rf build/fixture
	ZGOLDEN_VM_RESULTS_OUT=$(CURDIR)/build/fixture ZGOLDEN_VM_TEST_RUN='^TestWriteGoldenFixture$$' \
	  ZGOLDEN_VM_EXTRA_ENV=ZGOLDEN_GOLDEN_FIXTURE=/payload/results/golden.zgs.gz \
	  $(MAKE) test-vm ZFS=2.4 VM_PKGS=./zfsstore
	install -D -m 0644 build/fixture/golden.zgs.gz zfsstore/testdata/golden-zfs-2.4.zgs.gz

# Every release runs even when one fails, so one run reports them all.
.PHONY: test-vm-compat
test-vm-compat: ## as root: conformance (zfsstore), Docker end-to-end and crash suites on each COMPAT_ZFS release
	rc=0; for z in $(COMPAT_ZFS); do $(MAKE) test-vm ZFS=$$z VM_PKGS="$(COMPAT_PKGS)" VM_PREBUILT=$(VM_PREBUILT) || rc=1; done; exit $$rc

.PHONY: vm-guest
vm-guest: ## as root: build (or reuse the cached) guest and test images only
	ZGOLDEN_ZFS=$(ZFS) bash tests/vm/build-guest.sh

.PHONY: fuzz
fuzz: ## fuzz name, option and size parsing for FUZZTIME each
	$(GO) test -run '^$$' -fuzz '^FuzzParseCreate$$' -fuzztime $(FUZZTIME) ./driver/
	$(GO) test -run '^$$' -fuzz '^FuzzParseSize$$' -fuzztime $(FUZZTIME) ./driver/

.PHONY: verify
verify: ## gofmt, go vet and a tidy go.mod
	@out=$$(gofmt -l $$(git ls-files '*.go')); [ -z "$$out" ] || { echo "gofmt needed: $$out"; exit 1; }
	$(GO) vet ./...
	$(GO) mod tidy -diff

.PHONY: clean
clean: ## remove build outputs
	rm -rf bin build

# --- Installing (README "Installing"): the managed plugin and the host daemon ------------------
# `docker volume create --driver zgolden` finds only the :latest tag of a managed plugin, so that is
# the default name; PLUGIN_NAME=zgolden:$(VERSION) keeps builds apart (then --driver zgolden:TAG).
PLUGIN_NAME ?= zgolden:latest
PREFIX      ?= /usr/local
DESTDIR     ?=

.PHONY: plugin
plugin: build ## as root: assemble build/plugin (cached Debian rootfs + bin/zgolden), docker plugin create PLUGIN_NAME
	bash packaging/build-plugin.sh --create $(PLUGIN_NAME)

.PHONY: install
install: build ## as root: install the host daemon: PREFIX/bin/zgolden, zgolden.service, /etc/default/zgolden
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" BIN="$(CURDIR)/$(BIN)" bash packaging/install.sh install

.PHONY: uninstall
uninstall: ## as root: remove what make install installed (never volumes, goldens or changed settings)
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" bash packaging/install.sh uninstall

.PHONY: bench
bench: ## as root: benchmark against cp -a and the raw commands, on the host (reflink) and in the ZFS guest
	bash tests/setup/host-deps.sh
	bash tests/bench/run.sh
