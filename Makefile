# Set-up is part of every target: a fresh Debian machine needs only `make demo` or `make test`.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEBS    := libxen-dev gcc gcc-multilib libatomic1 iproute2 iputils-ping iperf3 fio
DEBSTAMP := $(VENV)/.debs

KERNEL  := backendd/dataplane/_blk_kernel.so

.PHONY: demo test lint bench fuzz clean debs native kernel

# The daemon and a simulated guest with a disk and a nic, for about 20 seconds.
DEMO_SECONDS ?= 20
demo: $(STAMP) $(KERNEL)
	$(PY) -m rings
	$(VENV)/bin/backendd demo --seconds $(DEMO_SECONDS)

test: $(STAMP) native $(KERNEL)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP) native $(KERNEL)
	$(PY) -m bench

# The benchmarks' C programs (bench/native/*.c) into build/native/.
native: $(STAMP)
	$(PY) -m bench.native

fuzz: $(STAMP) $(KERNEL)
	$(PY) -m bench.fuzz

# The compiled blk data plane (gcc -Wall -Wextra -Werror against Xen's headers).
kernel: $(KERNEL)
$(KERNEL): backendd/dataplane/blk_kernel.c backendd/dataplane/build.py $(STAMP)
	$(PY) -m backendd.dataplane.build

debs: $(DEBSTAMP)

# Install only what is missing, so a prepared machine does no network round trip.
$(DEBSTAMP):
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml $(DEBSTAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis $(KERNEL)
