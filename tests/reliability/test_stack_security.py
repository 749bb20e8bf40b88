"""The stack is safe by default: five promises, each checked on the files (and on real processes).

1. Compose binds every published port to 127.0.0.1, under every profile, as `docker compose config`
   interpolates the file with its defaults or with .env.example; no service shares the host's network.
2. The metrics port is never the app port: in compose, in the native demo's defaults and in spyglass's
   own default, and a gunicorn told to use one port for both refuses to run.
3. Grafana has no default credentials: its admin password comes from a required variable, anonymous
   visitors are at most Viewers, nobody signs up, and the provisioning files hold no credentials.
4. The demo's admin switches need a token: a real gunicorn serving the shop answers 403 while no token
   is configured, 401 without the right `Authorization: Bearer`, and works with it; compose requires the
   token from .env and gives it no default.
5. Nothing secret is committed: every file git would commit (and every blob of the history) is free of
   private keys, cloud and chat tokens, JWTs and passwords in URLs; only .env.example is committed, with
   its secrets empty, and .gitignore keeps .env out.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import string
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import flask.cli
import gunicorn.config
import pytest
import redis
import requests
import yaml

from demo_app import settings as shop_settings
from demo_app.native import PORT_VARIABLES, Ports
from spyglass.config import Settings, load_settings
from tests.conftest import (
    REPO,
    VENV_BIN,
    Gunicorn,
    clean_environment,
    free_port,
    start_gunicorn,
    start_redis_server,
    wait_for,
)
from tests.test_stack_files import (
    COMPOSE_FILE,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    ENV_EXAMPLE,
    TEST_ENV,
    _compose_command,
    walk,
)

LOOPBACK = "127.0.0.1"
GRAFANA_PROVISIONING = DATASOURCES.parent.parent
DEMO_WEB = REPO / "demo_app/web.py"
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE)
"""Names of variables and keys that hold a secret."""
REQUIRED_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?(?P<message>[^}]*)\}")
"""A compose interpolation that stops compose when the variable is unset or empty (no default)."""


# ---------------------------------------------------------------------------------------------
# docker compose config, the real binary


def compose_profiles() -> list[str]:
    """Every profile a service of docker-compose.yml lists, then `*` (all services at once)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return [*sorted({profile for service in raw.values() for profile in service.get("profiles") or []}), "*"]


def run_compose_config(
    profile: str, variables: Mapping[str, str], env_file: Path | None = None
) -> subprocess.CompletedProcess:
    """`docker compose config --format json` of the repository's file for `profile`, with only `variables`
    (and PATH/HOME) in the environment and `env_file` (none: no .env at all) as the .env file, so every
    other variable takes its default.
    """
    environment = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    environment.update(variables)
    command = [
        *_compose_command(),
        "-f",
        str(COMPOSE_FILE),
        "--project-directory",
        str(REPO),
        "--env-file",
        str(env_file) if env_file else os.devnull,
        "--profile",
        profile,
        "config",
        "--format",
        "json",
    ]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)


def compose_config(profile: str, variables: Mapping[str, str] = TEST_ENV, env_file: Path | None = None) -> dict:
    """The project as compose would run it (raises with compose's message when it refuses the file)."""
    result = run_compose_config(profile, variables, env_file)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def env_example_with_secrets(directory: Path) -> Path:
    """.env.example as a user's .env after filling in the two secrets (the other lines unchanged)."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={TEST_ENV[name]}" if name in TEST_ENV and "=" in line else line)
    path = directory / "env"
    path.write_text("\n".join(lines) + "\n")
    return path


def exposure_problems(services: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What makes a service reachable from other machines in `docker compose config` output: a published
    port not bound to 127.0.0.1 (no host_ip means every address), or the host's network namespace.
    """
    problems = []
    for name, service in sorted(services.items()):
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host (every port it opens is on the host's interfaces)")
        for port in service.get("ports") or []:
            if port.get("host_ip") != LOOPBACK:
                problems.append(
                    f"{name}: publishes {port.get('published')} on {port.get('host_ip') or 'every address'}"
                )
    return problems


# ---------------------------------------------------------------------------------------------
# 1. Every published port binds 127.0.0.1


@pytest.mark.parametrize("source", ["defaults", ".env.example"])
@pytest.mark.parametrize("profile", compose_profiles())
def test_every_published_port_binds_loopback(profile: str, source: str, tmp_path: Path) -> None:
    """Under every profile, with compose's defaults (no .env) or with .env.example copied to .env, every
    port a service publishes binds 127.0.0.1 and no service uses the host's network: the stack
    (Prometheus, Loki, Tempo, OTLP, the shop's admin API) is reachable from this machine only.

    Interpolation is compose's own, so a bind address taken from a variable is checked at its default
    and at the value .env.example gives it.
    """
    env_file = env_example_with_secrets(tmp_path) if source == ".env.example" else None
    services = compose_config(profile, env_file=env_file)["services"]
    assert services, f"profile {profile} runs no service"
    assert any(service.get("ports") for service in services.values()), f"profile {profile} publishes nothing"
    assert exposure_problems(services) == []
    if profile == "*":
        assert set(services) == set(yaml.safe_load(COMPOSE_FILE.read_text())["services"])


def test_exposure_check_catches_open_ports(tmp_path: Path) -> None:
    """The check is not vacuous: compose's output for a port without an address, one on 0.0.0.0, one on
    `::`, one whose address variable defaults to 0.0.0.0, and a service on the host network is refused;
    a port on 127.0.0.1 is not.
    """
    compose_file = tmp_path / "compose.yml"
    compose_file.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "open": {"image": "busybox:1.37.0", "ports": ["8000:8000", "0.0.0.0:8001:8001", "[::]:8002:8002"]},
                    "variable": {"image": "busybox:1.37.0", "ports": ["${BIND:-0.0.0.0}:8003:8003"]},
                    "host": {"image": "busybox:1.37.0", "network_mode": "host"},
                    "closed": {"image": "busybox:1.37.0", "ports": ["127.0.0.1:8004:8004"]},
                }
            }
        )
    )
    environment = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    result = subprocess.run(
        [*_compose_command(), "-f", str(compose_file), "--env-file", os.devnull, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    problems = exposure_problems(json.loads(result.stdout)["services"])
    assert problems == [
        "host: network_mode host (every port it opens is on the host's interfaces)",
        "open: publishes 8000 on every address",
        "open: publishes 8001 on 0.0.0.0",
        "open: publishes 8002 on ::",
        "variable: publishes 8003 on 0.0.0.0",
    ]


# ---------------------------------------------------------------------------------------------
# 2. The metrics port is not the app port


def served_ports(command: list[str]) -> set[int]:
    """Ports a command line serves on: gunicorn's `-b`/`--bind host:port` and a `--port N` option."""
    ports: set[int] = set()
    for index, argument in enumerate(command):
        value = None
        if argument in ("-b", "--bind", "--port") and index + 1 < len(command):
            value = command[index + 1]
        elif argument.startswith(("--bind=", "--port=")):
            value = argument.split("=", 1)[1]
        if value is not None:
            ports.add(int(value.rsplit(":", 1)[-1]))
    return ports


@pytest.mark.parametrize("profile", compose_profiles())
def test_compose_metrics_port_is_not_the_app_port(profile: str) -> None:
    """In every profile, each instrumented service's SPYGLASS_METRICS_PORT differs from every port its
    command serves (the shop's gunicorn `-b`), and no host port is published twice, so the metrics and
    the API never compete for a port inside the container or on the host.
    """
    services = compose_config(profile)["services"]
    instrumented = {
        name: service
        for name, service in services.items()
        if "SPYGLASS_METRICS_PORT" in (service.get("environment") or {})
    }
    assert instrumented, f"profile {profile} runs no instrumented service"
    apps = 0
    for name, service in instrumented.items():
        metrics_port = int(service["environment"]["SPYGLASS_METRICS_PORT"])
        app_ports = served_ports(service.get("command") or [])
        apps += bool(app_ports)
        assert metrics_port not in app_ports, f"{name}: metrics port {metrics_port} is also its app port"
    assert apps, f"profile {profile}: no instrumented service serves an app port (the check saw nothing)"
    published = [port["published"] for service in services.values() for port in service.get("ports") or []]
    assert len(published) == len(set(published)), f"a host port is published twice: {sorted(published)}"


def test_served_ports_reads_bind_options() -> None:
    """The command-line reader above finds the ports it has to compare."""
    assert served_ports(["gunicorn", "-w", "2", "-b", "0.0.0.0:8000", "app:app"]) == {8000}
    assert served_ports(["gunicorn", "--bind=127.0.0.1:9000", "--bind", "[::1]:9001"]) == {9000, 9001}
    assert served_ports(["python", "-m", "demo_app.alert_sink", "--host", "0.0.0.0", "--port", "9095"]) == {9095}
    assert served_ports(["celery", "-A", "demo_app.tasks", "worker"]) == set()


def test_native_demo_port_defaults_are_distinct() -> None:
    """`make demo` (demo_app/native.py) listens on a different port for each thing: the API is not the web
    metrics port, nor any other default.
    """
    ports = Ports.from_environment({})
    named = ports.named()
    assert ports.app != ports.web_metrics
    assert len(set(named.values())) == len(named), named
    assert set(named) == set(PORT_VARIABLES)


def test_native_demo_refuses_two_services_on_one_port() -> None:
    """Setting the API port (DEMO_PORT) to the web's metrics port, or any two ports to one number, is
    refused before anything starts, with a message naming both variables and the port.
    """
    web_metrics = next(name for name, (field, _default) in PORT_VARIABLES.items() if field == "web_metrics")
    app = next(name for name, (field, _default) in PORT_VARIABLES.items() if field == "app")
    with pytest.raises(SystemExit, match=rf"{app} and {web_metrics} are all 9464|{web_metrics} and {app} are all 9464"):
        Ports.from_environment({app: "9464"})


def test_spyglass_default_metrics_port_is_not_an_app_port() -> None:
    """The default metrics port of spyglass (9464, the OpenTelemetry Prometheus exporter's) is neither
    gunicorn's default port, nor `flask run`'s, nor the demo's API port, so an app started with the
    defaults never collides with its metrics endpoint.
    """
    default = load_settings({}).metrics_port
    assert default == Settings().metrics_port == 9464
    gunicorn_port = int(gunicorn.config.Bind.default[0].rsplit(":", 1)[1])
    flask_port = next(parameter.default for parameter in flask.cli.run_command.params if parameter.name == "port")
    assert default not in {gunicorn_port, flask_port, Ports.from_environment({}).app}


@pytest.mark.timeout(120)
def test_gunicorn_refuses_to_serve_the_app_on_the_metrics_port(tmp_path: Path) -> None:
    """A user who sets SPYGLASS_METRICS_PORT to gunicorn's own port gets a gunicorn that exits with an
    error naming SPYGLASS_METRICS_PORT and the port, at once, before anything listens on it.
    """
    port = free_port()
    env = clean_environment(
        PYTHONPATH=str(REPO),
        OTEL_SERVICE_NAME="shop",
        OTEL_TRACES_EXPORTER="none",
        SPYGLASS_METRICS_PORT=str(port),
        SPYGLASS_METRICS_DIR=str(tmp_path / "metrics"),
    )
    log_path = tmp_path / "gunicorn.log"
    command = [
        str(VENV_BIN / "gunicorn"),
        "-c",
        "python:spyglass.gunicorn",
        "-w",
        "1",
        "-b",
        f"{LOOPBACK}:{port}",
        "--no-control-socket",
        "tests.apps.shop:app",
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        returncode = process.wait(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert returncode != 0, log
    assert f"SPYGLASS_METRICS_PORT={port}" in log, log
    assert "Connection in use" not in log, log


# ---------------------------------------------------------------------------------------------
# 3. Grafana has no default credentials


def test_grafana_admin_password_comes_from_a_required_variable() -> None:
    """Grafana's admin password is `${GRAFANA_ADMIN_PASSWORD:?...}`, with no default anywhere: compose
    refuses to start, naming the variable, when it is missing or empty (in .env.example it is empty), and
    passes the user's value through when it is set. Without it Grafana would fall back to admin/admin.
    """
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]["environment"]
    required = REQUIRED_VARIABLE.fullmatch(raw["GF_SECURITY_ADMIN_PASSWORD"])
    assert required and required.group("name") == "GRAFANA_ADMIN_PASSWORD", raw["GF_SECURITY_ADMIN_PASSWORD"]
    assert not any(key.startswith("GF_SECURITY_ADMIN_PASSWORD") and key != "GF_SECURITY_ADMIN_PASSWORD" for key in raw)
    grafana_profiles = [p for p in compose_profiles() if "grafana" in compose_config(p)["services"]]
    assert grafana_profiles
    for profile in grafana_profiles:
        for variables in ({"DEMO_ADMIN_TOKEN": "t"}, {"DEMO_ADMIN_TOKEN": "t", "GRAFANA_ADMIN_PASSWORD": ""}):
            result = run_compose_config(profile, variables)
            assert result.returncode != 0, f"{profile}: compose started Grafana without a password"
            assert "set GRAFANA_ADMIN_PASSWORD in .env" in result.stderr, result.stderr
        result = run_compose_config(profile, {"DEMO_ADMIN_TOKEN": "t"}, env_file=ENV_EXAMPLE)
        assert result.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in result.stderr, result.stderr
        password = secrets.token_hex(16)
        grafana = compose_config(profile, {**TEST_ENV, "GRAFANA_ADMIN_PASSWORD": password})["services"]["grafana"]
        assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == password


def test_grafana_visitors_are_viewers_at_most_and_cannot_sign_up() -> None:
    """Anyone who reaches Grafana without logging in may look but not change (anonymous role Viewer, or
    anonymous access off), nobody can create an account or an organisation, and no other login method
    that trusts a header (the auth proxy) is switched on.
    """
    environment = compose_config("*")["services"]["grafana"]["environment"]
    if environment.get("GF_AUTH_ANONYMOUS_ENABLED", "false").lower() == "true":
        assert environment.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer", environment
    assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert environment.get("GF_USERS_ALLOW_ORG_CREATE", "false") == "false"
    assert environment.get("GF_AUTH_PROXY_ENABLED", "false") == "false"


def credential_problems(node: Any, source: str) -> list[str]:
    """Credentials in a parsed provisioning file: a secret-named key with a value, `secureJsonData`,
    basic auth switched on, or a URL carrying a user and password.
    """
    problems = []
    for key, value in walk(node):
        if key == "secureJsonData" and value:
            problems.append(f"{source}: secureJsonData holds {sorted(value)}")
        elif SECRET_NAME.search(key) and value not in (None, "", {}, []):
            problems.append(f"{source}: {key} is set")
        elif key in ("basicAuth", "basicAuthUser") and value not in (False, None, ""):
            problems.append(f"{source}: {key} is {value!r}")
        elif isinstance(value, str) and "://" in value and urlsplit(value).password:
            problems.append(f"{source}: {key} carries a password in its URL")
    return problems


def test_grafana_provisioning_holds_no_credentials() -> None:
    """The data sources and dashboard providers Grafana provisions carry no password, token, secure
    JSON data, basic auth or credentials in a URL: the stack's backends are reached on the compose
    network without secrets, and none sits in the repository for Grafana to read.
    """
    files = sorted(path for path in GRAFANA_PROVISIONING.rglob("*") if path.is_file())
    assert DATASOURCES in files and DASHBOARD_PROVIDERS in files
    for path in files:
        assert path.suffix in (".yaml", ".yml", ".json"), f"unexpected provisioning file {path}"
        assert credential_problems(yaml.safe_load(path.read_text()), path.name) == []


def test_credential_check_catches_credentials() -> None:
    """The provisioning check is not vacuous: each kind of credential is reported, a clean source is not."""
    clean = {"datasources": [{"name": "p", "url": "http://prometheus:9090", "jsonData": {"httpMethod": "POST"}}]}
    assert credential_problems(clean, "f") == []
    leaky = {
        "datasources": [
            {
                "url": f"http://admin:{secrets.token_hex(8)}@prometheus:9090",
                "basicAuth": True,
                "basicAuthUser": "admin",
            },
            {"secureJsonData": {"basicAuthPassword": "x"}},
            {"jsonData": {"apiKey": "k"}, "password": "p"},
        ]
    }
    assert credential_problems(leaky, "f") == [
        "f: url carries a password in its URL",
        "f: basicAuth is True",
        "f: basicAuthUser is 'admin'",
        "f: secureJsonData holds ['basicAuthPassword']",
        "f: basicAuthPassword is set",
        "f: apiKey is set",
        "f: password is set",
    ]


def test_make_stack_env_writes_generated_secrets_once(tmp_path: Path) -> None:
    """`make stack-env` turns .env.example into a .env only its owner can read, with a fresh random
    Grafana password and admin token (never empty, never the same), and leaves an existing .env alone.
    """
    for name in ("Makefile", ".env.example"):
        (tmp_path / name).write_text((REPO / name).read_text())
    make = ["make", "-s", "-C", str(tmp_path), "stack-env", f"PYTHON={sys.executable}"]
    subprocess.run(make, check=True, capture_output=True, timeout=60)
    env_file = tmp_path / ".env"
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")
    password, token = values["GRAFANA_ADMIN_PASSWORD"], values["DEMO_ADMIN_TOKEN"]
    assert len(password) >= 32 and len(token) >= 32 and password != token
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert set(values) == {
        key
        for key in (line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines())
        if key and key[0] != "#"
    }
    subprocess.run(make, check=True, capture_output=True, timeout=60)
    assert env_file.read_text().count(password) == 1, "a second run must keep the existing secrets"


# ---------------------------------------------------------------------------------------------
# 4. The demo's admin switches need a token

ADMIN_TOKEN = secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of this module's own (the fault switches live in one fixed key; nobody else sees it)."""
    port = free_port()
    server = start_redis_server(tmp_path_factory.mktemp("redis"), port)
    try:
        yield f"redis://{LOOPBACK}:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


def start_shop(tmp: Path, redis_url: str, admin_token: str | None) -> Gunicorn:
    """The demo shop's API (`demo_app.web:app`) under gunicorn with spyglass's hooks, as compose runs it."""
    token = {"DEMO_ADMIN_TOKEN": admin_token} if admin_token is not None else {}
    server = start_gunicorn(
        tmp,
        workers=1,
        app="demo_app.web:app",
        unset=("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DEMO_ADMIN_TOKEN"),
        OTEL_SERVICE_NAME="shop-web",
        OTEL_TRACES_EXPORTER="none",
        DEMO_VAR_DIR=str(tmp / "var"),
        DEMO_REDIS_URL=redis_url,
        **token,
    )
    if not wait_for(lambda: _answers(server.url + "/healthz"), timeout=30):
        server.stop()
        raise RuntimeError("the shop does not answer /healthz:\n" + server.log_text())
    return server


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def shops(tmp_path_factory: pytest.TempPathFactory, private_redis: str) -> Iterator[dict[str, Gunicorn]]:
    """Two shops side by side: one started without DEMO_ADMIN_TOKEN, one with it."""
    tmp = tmp_path_factory.mktemp("shops")
    started: dict[str, Gunicorn] = {}
    try:
        started["without token"] = start_shop(tmp / "without", private_redis, None)
        started["with token"] = start_shop(tmp / "with", private_redis, ADMIN_TOKEN)
        yield started
    finally:
        for server in started.values():
            server.stop()


def admin(server: Gunicorn, method: str, headers: Mapping[str, str] | None = None, **kwargs: Any) -> requests.Response:
    """One call of /admin/faults (a PUT sends a harmless change unless `json` says otherwise)."""
    if method == "PUT":
        kwargs.setdefault("json", {"latency_ms": 5})
    return requests.request(method, f"{server.url}/admin/faults", headers=dict(headers or {}), timeout=10, **kwargs)


def stored_switches(redis_url: str) -> bytes | None:
    """The fault-switch overrides in Redis (what every process of the shop obeys)."""
    return redis.Redis.from_url(redis_url).get("demo:faults")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_admin_switches_are_off_without_a_configured_token(
    shops: dict[str, Gunicorn], private_redis: str, method: str
) -> None:
    """A shop started without DEMO_ADMIN_TOKEN answers every /admin/faults call 403 ("set
    DEMO_ADMIN_TOKEN"), whatever token the caller sends (none, an empty bearer, the literal `None`, a
    real-looking one), and changes nothing.
    """
    server = shops["without token"]
    for headers in ({}, {"Authorization": "Bearer "}, bearer("None"), bearer(ADMIN_TOKEN)):
        response = admin(server, method, headers)
        assert response.status_code == 403, (headers, response.status_code, response.text)
        assert "DEMO_ADMIN_TOKEN" in response.json()["error"]
    assert stored_switches(private_redis) is None
    for blank in ("", " ", "\t\n"):
        assert shop_settings.load({"DEMO_ADMIN_TOKEN": blank}).admin_token is None, "a blank token must mean off"


def wrong_credentials() -> list[dict[str, str]]:
    """Requests that must not pass: no header, wrong token, a token one character short or long, the
    token without its scheme, under another scheme or header, and an empty bearer.
    """
    basic = base64.b64encode(f"admin:{ADMIN_TOKEN}".encode()).decode()
    return [
        {},
        bearer("wrong"),
        bearer(ADMIN_TOKEN[:-1]),
        bearer(ADMIN_TOKEN + "x"),
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Basic {basic}"},
        {"Authorization": f"Token {ADMIN_TOKEN}"},
        {"Authorization": "Bearer "},
        {"X-Admin-Token": ADMIN_TOKEN},
    ]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_admin_switches_refuse_a_missing_or_wrong_bearer_token(
    shops: dict[str, Gunicorn], private_redis: str, method: str
) -> None:
    """With DEMO_ADMIN_TOKEN configured, /admin/faults answers 401 with `WWW-Authenticate: Bearer` to every
    request without exactly `Authorization: Bearer <token>` (nor does a `?token=` query string pass), never
    echoes the token, and a refused PUT or DELETE leaves the switches as they were.
    """
    server = shops["with token"]
    before = admin(server, "PUT", bearer(ADMIN_TOKEN), json={"latency_ms": 1})
    assert before.status_code == 200, before.text
    stored = stored_switches(private_redis)
    assert stored is not None
    try:
        for headers in wrong_credentials():
            response = admin(server, method, headers)
            assert response.status_code == 401, (headers, response.status_code, response.text)
            assert response.headers.get("WWW-Authenticate", "").startswith("Bearer"), response.headers
            assert ADMIN_TOKEN not in response.text
        response = admin(server, method, params={"token": ADMIN_TOKEN})
        assert response.status_code == 401
        assert stored_switches(private_redis) == stored
    finally:
        assert admin(server, "DELETE", bearer(ADMIN_TOKEN)).status_code == 200


def test_admin_switches_work_with_the_right_token(shops: dict[str, Gunicorn], private_redis: str) -> None:
    """With the right bearer token GET reads the switches, PUT changes them (in Redis, for every process)
    and DELETE clears them.
    """
    server = shops["with token"]
    response = admin(server, "GET", bearer(ADMIN_TOKEN))
    assert response.status_code == 200 and response.json()["latency_ms"] == 0, response.text
    response = admin(server, "PUT", bearer(ADMIN_TOKEN), json={"latency_ms": 5})
    assert response.status_code == 200 and response.json()["latency_ms"] == 5, response.text
    assert json.loads(stored_switches(private_redis) or b"{}") == {"latency_ms": 5}
    response = admin(server, "DELETE", bearer(ADMIN_TOKEN))
    assert response.status_code == 200 and response.json()["latency_ms"] == 0, response.text
    assert stored_switches(private_redis) is None


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    found = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == name]
    assert len(found) == 1, f"{name} defined {len(found)} times"
    return found[0]


def comparison_problems(source: str, function: str) -> list[str]:
    """How `function` in `source` fails to compare the caller's credentials in constant time: it never
    calls `hmac.compare_digest`, or it compares strings with `==`/`!=`/`in` (which stop at the first
    differing character).
    """
    node = _function(ast.parse(source), function)
    problems = []
    calls = [
        call
        for call in ast.walk(node)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "compare_digest"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id in ("hmac", "secrets")
    ]
    if not calls:
        problems.append(f"{function} does not call hmac.compare_digest")
    for compare in (child for child in ast.walk(node) if isinstance(child, ast.Compare)):
        if any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in compare.ops):
            problems.append(f"{function} line {compare.lineno}: {ast.unparse(compare)}")
    return problems


def test_admin_token_is_compared_in_constant_time() -> None:
    """demo_app/web.py's `_require_admin` compares the Authorization header with `hmac.compare_digest`
    and nowhere with `==`, so the time a refusal takes does not tell an attacker how much of the token
    they guessed.
    """
    assert comparison_problems(DEMO_WEB.read_text(), "_require_admin") == []


def test_comparison_check_catches_plain_equality() -> None:
    """The constant-time check is not vacuous: `==` and a missing compare_digest are reported."""
    plain = "def check(given, token):\n    if given != f'Bearer {token}':\n        raise PermissionError\n"
    assert comparison_problems(plain, "check") == [
        "check does not call hmac.compare_digest",
        "check line 2: given != f'Bearer {token}'",
    ]
    constant = "import hmac\ndef check(given, token):\n    return hmac.compare_digest(given.encode(), token.encode())\n"
    assert comparison_problems(constant, "check") == []


def test_compose_requires_the_demo_admin_token() -> None:
    """In compose the shop's admin token is `${DEMO_ADMIN_TOKEN:?...}` with no default: under every
    profile compose refuses to start, naming the variable, while it is missing or empty, and passes
    the user's value to the shop's API when it is set.
    """
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    required = REQUIRED_VARIABLE.fullmatch(raw["web"]["environment"]["DEMO_ADMIN_TOKEN"])
    assert required and required.group("name") == "DEMO_ADMIN_TOKEN"
    for profile in compose_profiles():
        for variables in ({"GRAFANA_ADMIN_PASSWORD": "p"}, {"GRAFANA_ADMIN_PASSWORD": "p", "DEMO_ADMIN_TOKEN": ""}):
            result = run_compose_config(profile, variables)
            assert result.returncode != 0, f"{profile}: compose started the shop without an admin token"
            assert "set DEMO_ADMIN_TOKEN in .env" in result.stderr, result.stderr
        token = secrets.token_hex(16)
        services = compose_config(profile, {**TEST_ENV, "DEMO_ADMIN_TOKEN": token})["services"]
        assert services["web"]["environment"]["DEMO_ADMIN_TOKEN"] == token


def test_every_secret_in_compose_is_a_required_variable() -> None:
    """Every environment variable compose gives a container whose name says it is a secret (password,
    token, secret, key, credential) is `${VAR:?...}`: no secret has a default, a literal value or an
    optional fallback in docker-compose.yml, and .env.example leaves each such variable empty.
    """
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    secret_entries = {
        (name, key): value
        for name, service in raw["services"].items()
        for key, value in (service.get("environment") or {}).items()
        if SECRET_NAME.search(key)
    }
    assert secret_entries, "compose passes no secret at all (the check saw nothing)"
    variables = set()
    for (name, key), value in secret_entries.items():
        required = REQUIRED_VARIABLE.fullmatch(str(value))
        assert required, f"{name}: {key}={value!r} is not a required variable"
        variables.add(required.group("name"))
    example = dict(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    for variable in sorted(variables | {name for name in example if SECRET_NAME.search(name)}):
        assert example.get(variable) == "", f".env.example must leave {variable} empty, not {example.get(variable)!r}"


# ---------------------------------------------------------------------------------------------
# 5. Nothing secret is committed


@dataclass(frozen=True)
class SecretPattern:
    """One kind of secret the scanner looks for."""

    name: str
    regex: re.Pattern[str]


SECRET_PATTERNS = (
    SecretPattern("private key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    SecretPattern("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    SecretPattern(
        "AWS secret access key",
        re.compile(r"(?i)aws_?secret_?access_?key\W{0,4}[=:]\W{0,3}[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
    ),
    SecretPattern("GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b")),
    SecretPattern("Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    SecretPattern(
        "Slack webhook", re.compile(r"https://hooks\.slack\.com/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/[A-Za-z0-9]+")
    ),
    SecretPattern("JWT", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")),
    SecretPattern(
        "password in URL",
        re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://(?P<user>[^\s:/?#@'\"`]*):(?P<password>[^\s/?#@'\"`]+)@"),
    ),
)
URL_CREDENTIAL_PLACEHOLDERS = frozenset({("guest", "guest")})
"""user:password pairs documented as public defaults: guest/guest is the local RabbitMQ's built-in account."""
PLACEHOLDER_PASSWORD = re.compile(
    r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::?-[^}]*)?\}?|\{[^{}]*\}|<[^<>]*>|\*+|x+|\.\.\.|%\([a-z_]+\)s"
)
"""A password that is a template, not a value: `${VAR}`, `$VAR`, `{password}`, `<password>`, `***`, `...`."""
COMMITTABLE_ENV_FILES = frozenset({".env.example"})
SECRET_FILE = re.compile(
    r"(^|/)(\.env(\.[^/]*)?|[^/]+\.env|id_(rsa|dsa|ecdsa|ed25519)|[^/]+\.(pem|key|p12|pfx|jks|keystore))$"
)
"""Files that hold secrets by their nature: .env files, private keys and key stores."""


def find_secrets(text: str) -> list[tuple[str, str]]:
    """(pattern name, match) for each secret in `text`; documented placeholders in URLs are not secrets."""
    found = []
    for pattern in SECRET_PATTERNS:
        for match in pattern.regex.finditer(text):
            if pattern.name == "password in URL":
                user, password = match.group("user"), match.group("password")
                if (user, password) in URL_CREDENTIAL_PLACEHOLDERS or PLACEHOLDER_PASSWORD.fullmatch(password):
                    continue
            found.append((pattern.name, match.group()))
    return found


def secret_file_problem(path: str) -> str | None:
    """Why `path` must not be committed, if it must not."""
    if Path(path).name in COMMITTABLE_ENV_FILES or not SECRET_FILE.search(path):
        return None
    return f"{path} is a secrets file"


def committable_files() -> list[str]:
    """Every file git would commit: tracked ones and untracked ones .gitignore does not exclude."""
    result = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return sorted({path for path in result.stdout.decode().split("\0") if path})


def history_blobs() -> Iterator[tuple[str, bytes]]:
    """(path, content) of every file version reachable from any ref: what `git push --all` publishes."""
    objects = subprocess.run(
        ["git", "rev-list", "--objects", "--all"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    paths = dict(line.split(" ", 1) for line in objects if " " in line)
    batch = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=REPO,
        input="".join(f"{sha}\n" for sha in paths).encode(),
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    position = 0
    while position < len(batch):
        header_end = batch.index(b"\n", position)
        sha, kind, size = batch[position:header_end].decode().split()
        start = header_end + 1
        if kind == "blob":
            yield paths[sha], batch[start : start + int(size)]
        position = start + int(size) + 1


def text_of(content: bytes) -> str | None:
    """The text of a file, or None for a binary one (a NUL byte)."""
    return None if b"\0" in content else content.decode("utf-8", errors="replace")


def test_no_secret_in_any_committable_file() -> None:
    """No file git would commit (tracked, or new and not ignored) is a .env, a key or a key store, or
    contains a private key, an AWS key, a GitHub or Slack token, a JWT or a password in a URL (other
    than the documented guest:guest of the local RabbitMQ and template placeholders).
    """
    paths = committable_files()
    assert "docker-compose.yml" in paths and "tests/reliability/test_stack_security.py" in paths
    problems = []
    scanned = 0
    for path in paths:
        if problem := secret_file_problem(path):
            problems.append(problem)
        file = REPO / path
        if not file.is_file():
            continue  # deleted in the working tree
        text = text_of(file.read_bytes())
        if text is None:
            continue
        scanned += 1
        problems += [f"{path}: {name}: {match[:12]}..." for name, match in find_secrets(text)]
    assert scanned >= 100, f"only {scanned} text files scanned"
    assert problems == []


def test_no_secret_in_the_history() -> None:
    """No version of any file reachable from a branch or tag held a secret or was a secrets file:
    deleting a leaked key in a later commit does not unpublish it.
    """
    problems = []
    blobs = 0
    for path, content in history_blobs():
        blobs += 1
        if problem := secret_file_problem(path):
            problems.append(problem)
        text = text_of(content)
        if text is not None:
            problems += [f"{path}: {name}: {match[:12]}..." for name, match in find_secrets(text)]
    assert blobs >= 100, f"only {blobs} blobs in the history"
    assert sorted(set(problems)) == []


def _random(alphabet: str, length: int) -> str:
    return "".join(random.choices(alphabet, k=length))


def secret_samples() -> dict[str, str]:
    """One sample of each secret, built at run time so no secret (nor anything matching) is committed."""
    upper_digits = string.ascii_uppercase + string.digits
    alnum = string.ascii_letters + string.digits

    def b64url(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": "admin", "iat": 1700000000}).encode())
    signature = b64url(hmac.new(secrets.token_bytes(32), f"{header}.{payload}".encode(), hashlib.sha256).digest())
    dashes = "-" * 5
    key_kind = random.choice(["RSA ", "EC ", "OPENSSH ", "ENCRYPTED ", ""])
    return {
        "private key": f"{dashes}BEGIN {key_kind}PRIVATE KEY{dashes}\n"
        + base64.b64encode(secrets.token_bytes(48)).decode(),
        "AWS access key id": "AKIA" + _random(upper_digits, 16),
        "AWS secret access key": "aws_secret_access_key = " + _random(alnum + "/+", 40),
        "GitHub token": "gh" + random.choice("pousr") + "_" + _random(alnum, 36),
        "Slack token": "xox" + random.choice("bp") + "-" + "-".join(_random(string.digits, 12) for _ in range(3)),
        "Slack webhook": "https://hooks.slack.com/services/T"
        + _random(upper_digits, 10)
        + "/B"
        + _random(upper_digits, 10)
        + "/"
        + _random(alnum, 24),
        "JWT": f"{header}.{payload}.{signature}",
        "password in URL": f"postgresql://shop:{secrets.token_urlsafe(12)}@db.example:5432/shop",
    }


def test_each_secret_pattern_catches_its_sample() -> None:
    """Each pattern of the scanner finds a freshly made secret of its kind, embedded in ordinary text,
    and only that pattern fires on it; every pattern has a sample.
    """
    samples = secret_samples()
    assert set(samples) == {pattern.name for pattern in SECRET_PATTERNS}
    for name, sample in samples.items():
        found = find_secrets(f'settings = {{"value": "{sample}"}}  # pasted from the console\n')
        assert [kind for kind, _ in found] == [name], (name, found)


def test_scanner_leaves_placeholders_and_ordinary_text_alone() -> None:
    """The documented RabbitMQ guest:guest, passwords that are variables or templates, URLs without a
    password, and ordinary identifiers are not reported (so the scanner does not cry wolf).
    """
    harmless = [
        "amqp://guest:guest@127.0.0.1:5672//",
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "redis://:${REDIS_PASSWORD}@redis:6379/0",
        "postgresql://shop:$DB_PASSWORD@db/shop",
        "f'{scheme}://{user}:{password}@{host}'",
        "postgresql+psycopg://user:<password>@host/db",
        "https://user:***@example.com",
        "http://127.0.0.1:8000/admin/faults",
        "Authorization: Bearer <DEMO_ADMIN_TOKEN>",
        "AKIA_IS_NOT_A_KEY",
        "GRAFANA_ADMIN_PASSWORD=",
    ]
    for text in harmless:
        assert find_secrets(text) == [], text


def test_secret_files_are_recognised() -> None:
    """.env and its variants, keys and key stores are secrets files; .env.example and ordinary files are not."""
    for path in (".env", ".env.local", "deploy/.env.production", "prod.env", "id_rsa", "certs/server.key", "tls.pem"):
        assert secret_file_problem(path) == f"{path} is a secrets file", path
    for path in (".env.example", "docker-compose.yml", "docs/environment.md", "keys.py", "demo_app/settings.py"):
        assert secret_file_problem(path) is None, path


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".env", True),
        (".env.local", True),
        (".env.production", True),
        ("demo_app/.env", True),
        (".env.example", False),
    ],
)
def test_gitignore_keeps_env_files_out(path: str, ignored: bool) -> None:
    """Git's own rules (`git check-ignore --no-index`) ignore .env and its variants anywhere, so
    `git add -A` never picks up the secrets `make stack-env` writes, while .env.example stays committable.
    """
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO, timeout=30)
    assert result.returncode == (0 if ignored else 1), f"{path}: git check-ignore exited {result.returncode}"
