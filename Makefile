# Set-up is part of every target: a fresh Debian machine needs only `make demo` or `make test`.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEBS    := libxen-dev gcc gcc-multilib libatomic1 iproute2 iputils-ping iperf3 fio e2fsprogs \
           prometheus python3-libnbd libnbd-bin libnbd-dev qemu-utils nbdkit openssl
# Debian's libnbd bindings (python3-libnbd: not on the Python index) are seen by the venv
# through a .pth file naming a directory with just them, not the rest of dist-packages.
NBDPY   := /usr/lib/python3/dist-packages
DEBSTAMP := $(VENV)/.debs

KERNEL    := backendd/dataplane/_blk_kernel.so
NETKERNEL := backendd/dataplane/_net_kernel.so
NBDKERNEL := backendd/dataplane/_nbd_kernel.so
KERNELS   := $(KERNEL) $(NETKERNEL) $(NBDKERNEL)

.PHONY: demo test lint bench fuzz clean debs native kernel netkernel install uninstall

# The daemon and a simulated guest with a disk and a nic, for about 20 seconds.
DEMO_SECONDS ?= 20
demo: $(STAMP) $(KERNELS)
	$(PY) -m rings
	$(VENV)/bin/backendd demo --seconds $(DEMO_SECONDS)

# Hypothesis profile (tests/profiles.py): derandomized for `make test`, longer for `make fuzz`.
HYPOTHESIS_PROFILE ?= ci

test: $(STAMP) native $(KERNELS)
	$(VENV)/bin/ruff check .
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP) native $(KERNELS)
	$(PY) -m bench

# The benchmarks' C programs (bench/native/*.c) into build/native/.
native: $(STAMP)
	$(PY) -m bench.native

fuzz: $(STAMP) $(KERNELS)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz_*.py tests/test_blk_request.py \
	  tests/test_protocol_messages.py tests/test_layout_codecs.py
	$(PY) -m bench.fuzz

# The compiled blk data plane (gcc -Wall -Wextra -Werror against Xen's headers).
kernel: $(KERNEL) $(NBDKERNEL)
$(KERNEL): backendd/dataplane/blk_kernel.c backendd/dataplane/core.h backendd/dataplane/pool.h backendd/dataplane/build.py $(STAMP)
	$(PY) -m backendd.dataplane.build blk

# An NBD disk's reads and writes issued to libnbd from C (linked with libnbd-dev).
$(NBDKERNEL): backendd/dataplane/nbd_kernel.c backendd/dataplane/build.py $(STAMP)
	$(PY) -m backendd.dataplane.build nbd

# The compiled netif data plane (gcc -Wall -Wextra -Werror against Xen's headers).
netkernel: $(NETKERNEL)
$(NETKERNEL): backendd/dataplane/net_kernel.c backendd/dataplane/core.h backendd/dataplane/pool.h backendd/dataplane/build.py $(STAMP)
	$(PY) -m backendd.dataplane.build net

debs: $(DEBSTAMP)

# Install only what is missing, so a prepared machine does no network round trip.
# `prometheus` is here for its promtool (the tests check the metrics text with it); the
# Prometheus server it also installs is enabled and started by the package on a systemd
# host, so a fresh install of it is disabled and stopped again right away.
$(DEBSTAMP): Makefile
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  case " $$missing " in *" prometheus "*) \
	    if [ -d /run/systemd/system ]; then systemctl disable --now prometheus.service; fi;; \
	  esac; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml Makefile $(DEBSTAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	mkdir -p $(VENV)/debian-libnbd
	ln -sf $(NBDPY)/nbd.py $(NBDPY)/libnbdmod.cpython-*.so $(VENV)/debian-libnbd/
	$(PY) -c 'import site, sys; print(sys.prefix + "/debian-libnbd", file=open(site.getsitepackages()[0] + "/debian-libnbd.pth", "w"))'
	$(PY) -c 'import nbd' || { echo "python3-libnbd does not fit $(PY)"; exit 1; }
	touch $@

# `make install`: the package in its own venv under $(PREFIX)/lib/backendd with
# $(PREFIX)/bin/backendd linked to it, the systemd units, a sample configuration and the
# image directory the unit makes writable. DESTDIR stages it all under another root (the
# installed files name the final paths, not DESTDIR). Needs Python 3.11 and PyPI (or a pip
# cache) for the dependencies.
PREFIX     ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR    ?= $(PREFIX)/lib/systemd/system
STATEDIR   ?= /var/lib/backendd
LIBDIR     := $(PREFIX)/lib/backendd
CONFDIR    := $(SYSCONFDIR)/backendd

install:
	$(PYTHON) -m venv --clear $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q --disable-pip-version-check .
	@# The compiled blk and net data planes, built next to the installed package
	@# (-I: the installed one, not the source tree in the current directory).
	$(DESTDIR)$(LIBDIR)/bin/python -I -m backendd.dataplane.build blk net
	@# NBD disks' reads and writes from C, if libnbd-dev is there (else from Python).
	$(DESTDIR)$(LIBDIR)/bin/python -I -m backendd.dataplane.build nbd || \
	  echo "nbd_kernel.c not built (libnbd-dev missing): NBD commands go from Python"
	@# Scripts name the venv by its final path, not the staging one.
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -lIs -- '$(DESTDIR)' $(DESTDIR)$(LIBDIR)/bin/* | \
	    xargs -r sed -i 's|$(DESTDIR)$(LIBDIR)|$(LIBDIR)|g'; \
	fi
	@# NBD disks need Debian's libnbd bindings (python3-libnbd), seen as in the .venv.
	@if [ -e $(NBDPY)/nbd.py ]; then \
	  mkdir -p $(DESTDIR)$(LIBDIR)/debian-libnbd && \
	  ln -sf $(NBDPY)/nbd.py $(NBDPY)/libnbdmod.cpython-*.so $(DESTDIR)$(LIBDIR)/debian-libnbd/ && \
	  $(DESTDIR)$(LIBDIR)/bin/python -c 'import site; print("$(LIBDIR)/debian-libnbd", file=open(site.getsitepackages()[0] + "/debian-libnbd.pth", "w"))'; \
	else echo "python3-libnbd not installed: no NBD disks"; fi
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PREFIX)/share/doc/backendd
	ln -sfn $(LIBDIR)/bin/backendd $(DESTDIR)$(PREFIX)/bin/backendd
	sed 's|^ExecStart=/usr/local/bin/backendd|ExecStart=$(PREFIX)/bin/backendd|' \
	  systemd/backendd.service > $(DESTDIR)$(UNITDIR)/backendd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/backendd.service
	install -m 0644 systemd/backendd.socket $(DESTDIR)$(UNITDIR)/backendd.socket
	install -m 0644 LICENSE README.md $(DESTDIR)$(PREFIX)/share/doc/backendd/
	install -d -m 0755 $(DESTDIR)$(CONFDIR)
	install -m 0644 conf/backendd.toml $(DESTDIR)$(CONFDIR)/backendd.toml.sample
	@# An existing configuration is never overwritten.
	test -e $(DESTDIR)$(CONFDIR)/backendd.toml || \
	  install -m 0644 conf/backendd.toml $(DESTDIR)$(CONFDIR)/backendd.toml
	install -d -m 0700 $(DESTDIR)$(STATEDIR) $(DESTDIR)$(STATEDIR)/images
	@echo "installed; then: systemctl daemon-reload && systemctl enable --now backendd.socket"

# Removes what `make install` put there, except a configuration that was changed and the
# image directory (guests' disks).
uninstall:
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PREFIX)/share/doc/backendd
	rm -f $(DESTDIR)$(PREFIX)/bin/backendd
	rm -f $(DESTDIR)$(UNITDIR)/backendd.service $(DESTDIR)$(UNITDIR)/backendd.socket
	if cmp -s conf/backendd.toml $(DESTDIR)$(CONFDIR)/backendd.toml; then \
	  rm -f $(DESTDIR)$(CONFDIR)/backendd.toml; fi
	rm -f $(DESTDIR)$(CONFDIR)/backendd.toml.sample
	-rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null
	-rmdir $(DESTDIR)$(STATEDIR)/images $(DESTDIR)$(STATEDIR) 2>/dev/null
	@echo "uninstalled (kept: a changed $(CONFDIR)/backendd.toml, images in $(STATEDIR)/images)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis $(KERNELS)
