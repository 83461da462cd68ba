# Set-up is part of every target: a fresh Debian machine needs only `make demo` or `make test`.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEBS    := libxen-dev gcc gcc-multilib libatomic1 iproute2 iputils-ping iperf3 fio e2fsprogs \
           python3-libnbd libnbd-bin qemu-utils nbdkit
# Debian's libnbd bindings (python3-libnbd: not on the Python index) are seen by the venv
# through a .pth file naming a directory with just them, not the rest of dist-packages.
NBDPY   := /usr/lib/python3/dist-packages
DEBSTAMP := $(VENV)/.debs

.PHONY: demo test lint bench fuzz clean debs native

# The daemon and a simulated guest with a disk and a nic, for about 20 seconds.
DEMO_SECONDS ?= 20
demo: $(STAMP)
	$(PY) -m rings
	$(VENV)/bin/backendd demo --seconds $(DEMO_SECONDS)

# Hypothesis profile (tests/profiles.py): derandomized for `make test`, longer for `make fuzz`.
HYPOTHESIS_PROFILE ?= ci

test: $(STAMP) native
	$(VENV)/bin/ruff check .
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP) native
	$(PY) -m bench

# The benchmarks' C programs (bench/native/*.c) into build/native/.
native: $(STAMP)
	$(PY) -m bench.native

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz_*.py tests/test_blk_request.py \
	  tests/test_protocol_messages.py tests/test_layout_codecs.py
	$(PY) -m bench.fuzz

debs: $(DEBSTAMP)

# Install only what is missing, so a prepared machine does no network round trip.
$(DEBSTAMP): Makefile
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
