# networkd: `make demo` runs the daemon against a throw-away etcd; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: deps venv test demo demo-check bench-dns bench-failover bench-faults bench-hold bench-scale bench-cluster rpm clean

deps:
	scripts/install-deps.sh

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

test: deps venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: deps venv
	scripts/demo.sh

# The VIP demo without a person (root): the VIP answers, the kill moves it, nothing is left behind.
demo-check: deps venv
	$(PY) scripts/demo_vips.py --check

bench-dns: deps venv
	$(PY) bench/dns.py

bench-failover: deps venv
	$(PY) bench/failover.py

# etcd leader kill and partition heal: 3-member etcd, 3 namespaced nodes, 3 VIPs (root; about 3 minutes).
bench-faults: deps venv
	$(PY) bench/faults.py --runs 5

bench-hold: deps venv
	$(PY) bench/hold.py --configs 1000 --local 100
	$(PY) bench/hold.py --configs 1000 --local 1000

bench-scale: deps venv
	$(PY) bench/scale.py --sizes 1000,10000
	$(PY) bench/scale.py --sizes 40000 --puts 20 --burst 200 --burst-timeout 240
	$(PY) bench/scale.py --sizes 10000 --vips 1000 --local 100 --containers listening --forwarded 100000

# 20 namespaced nodes, 10 apps on all of them, 200 VIPs in one burst, SIGKILL of the busiest, etcd at rest (root; ~5 minutes).
bench-cluster: deps venv
	$(PY) bench/cluster.py --nodes 20 --runs 3

rpm:
	packaging/rpm/build.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
