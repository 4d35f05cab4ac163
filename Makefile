# `make demo`: set up and run the main job end to end on the embedded default.
# `make test`: set up and run the test suite (one node; `make test-cluster`: the multi-node tests).
# `make test-fast`: the Ray-free tests only (units, parsers, the log on disk), for development.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export KERAS_BACKEND := tensorflow
export TF_CPP_MIN_LOG_LEVEL := 2

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

.PHONY: install demo test test-fast test-cluster test-upgrade
install: $(VENV)/.installed

demo: install
	$(PY) demo.py

test: install
	$(PY) -m pytest -q

test-fast: install
	TEXTSERVE_FAST_LANE=1 $(PY) -m pytest -q -m "not integration" --timeout=120

# Five `serve deploy`s of changed configs under load: nothing may fail (minutes).
test-upgrade: install
	TEXTSERVE_SLOW=1 flock /tmp/ray-tests.lock $(PY) -m pytest -q -s tests/test_rolling_upgrade.py --timeout=1500

# Multi-node (minutes): four raylets on this machine (tests/test_cluster.py), and the real `ray up`
# of cluster/onprem.yaml on hosts that are network namespaces (tests/test_ray_up.py: root only).
test-cluster: install
	TEXTSERVE_CLUSTER_TEST=1 flock /tmp/ray-tests.lock $(PY) -m pytest -q -s -m cluster tests/test_cluster.py tests/test_ray_up.py
