# spyglass: `make demo` runs the instrumented demo natively; `make test` installs what it needs and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Debian packages the tests and the native demo run (binary:package).
SYSTEM_BINARIES := prometheus:prometheus promtool:prometheus amtool:prometheus-alertmanager \
	prometheus-alertmanager:prometheus-alertmanager redis-server:redis-server

.PHONY: all test lint demo stack stack-env bench bench-celery docs venv system-deps clean

all: test

$(STAMP): constraints.txt requirements-dev.txt demo_app/requirements.txt instrumentation/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt -r demo_app/requirements.txt -e './instrumentation[flask,gunicorn,celery,sqlalchemy]'
	touch $(STAMP)

venv: $(STAMP)

# `make bench` also counts instructions with valgrind.
BENCH_BINARIES := valgrind:valgrind

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) system-deps lint
	$(PY) -m pytest

demo: $(STAMP) system-deps
	$(PY) -m demo_app.native

# The compose stack (needs Docker): .env with fresh secrets on first use, then the full profile.
stack-env:
	@if [ -f .env ]; then echo ".env exists: keeping it"; else \
		secret() { $(PYTHON) -c 'import secrets; print(secrets.token_hex(16))'; }; \
		sed -e "s/^GRAFANA_ADMIN_PASSWORD=.*/GRAFANA_ADMIN_PASSWORD=$$(secret)/" \
		    -e "s/^DEMO_ADMIN_TOKEN=.*/DEMO_ADMIN_TOKEN=$$(secret)/" .env.example > .env && \
		chmod 600 .env && echo "wrote .env with a generated Grafana admin password and demo admin token"; fi

stack: stack-env
	docker compose up -d --wait
	@echo "Grafana http://127.0.0.1:$${GRAFANA_PORT:-3000} (anonymous viewing; admin password in .env)"

# Each benchmark rewrites only its own section of docs/performance.md.
bench: $(STAMP)
	$(MAKE) --no-print-directory system-deps SYSTEM_BINARIES="$(BENCH_BINARIES)"
	$(PY) -m benchmarks.run
	$(MAKE) --no-print-directory bench-celery

# Celery worker throughput and metrics scrape time (a real worker on Redis: the machine's, else a private one).
bench-celery: $(STAMP)
	$(MAKE) --no-print-directory system-deps SYSTEM_BINARIES="redis-server:redis-server"
	$(PY) -m benchmarks.celery_throughput
	$(PY) -m benchmarks.celery_scrape

docs: $(STAMP)
	$(PY) -m spyglass.catalog > docs/metrics.md

clean:
	rm -rf $(VENV) var .pytest_cache
