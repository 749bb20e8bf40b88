"""SQLAlchemy: a span and a duration per statement, queries counted per request, N+1 reported."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import flask
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, ForeignKey, create_engine, event, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

import spyglass
from spyglass import runtime
from spyglass.config import ConfigError, load_settings
from spyglass.integrations.sqlalchemy import SqlAlchemyInstrumentation, describe_statement
from spyglass.logs import flush_logs
from spyglass.query_tally import N_PLUS_ONE_EVENT
from tests.conftest import finished_spans

AUTHORS = 8


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def build_app(engine: Engine) -> flask.Flask:
    app = flask.Flask("library")

    @app.get("/authors/lazy")
    def lazy():
        with Session(engine) as session:
            return {author.name: len(author.books) for author in session.scalars(select(Author))}

    @app.get("/authors/eager")
    def eager():
        with Session(engine) as session:
            authors = session.scalars(select(Author).options(selectinload(Author.books)))
            return {author.name: len(author.books) for author in authors}

    @app.get("/health")
    def health():
        return "ok"

    @app.get("/broken")
    def broken():
        with engine.connect() as connection:
            connection.execute(text("SELECT * FROM no_such_table"))
        return "unreachable"

    return app


def seeded_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(Author(name=f"author-{n}", books=[Book(), Book()]) for n in range(AUTHORS))
        session.commit()
    return engine


@pytest.fixture
def library(tmp_path: Path) -> Iterator[Callable[..., tuple[flask.FlaskClient, Engine, Path]]]:
    traces = tmp_path / "traces.jsonl"

    def make(**env: str) -> tuple[flask.FlaskClient, Engine, Path]:
        settings = load_settings(
            {"OTEL_SERVICE_NAME": "library", "SPYGLASS_METRICS_PORT": "0", "SPYGLASS_TRACES_FILE": str(traces), **env}
        )
        runtime.init(settings)
        engine = seeded_engine(tmp_path / "library.db")
        spyglass.instrument_sqlalchemy(engine)
        return spyglass.instrument_flask(build_app(engine)).test_client(), engine, traces

    yield make
    runtime.shutdown()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def log_lines(capfd) -> list[dict]:
    flush_logs()
    return [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]


def test_each_statement_gets_a_client_span_under_the_request_with_stable_db_attributes(library) -> None:
    """Span name `{operation} {table}`, kind CLIENT, db.* attributes, parent = the request's span."""
    client, _engine, traces = library()
    assert client.get("/authors/eager").status_code == 200
    spans = finished_spans(traces)
    (request,) = [span for span in spans if span["name"] == "GET /authors/eager"]
    queries = [span for span in spans if span.get("parentSpanId") == request["spanId"]]
    assert sorted(span["name"] for span in queries) == ["SELECT authors", "SELECT books"]
    books = next(span for span in queries if span["name"] == "SELECT books")
    assert books["kind"] == 3  # CLIENT
    assert books["traceId"] == request["traceId"]
    attributes = books["attributes"]
    assert attributes["db.system.name"] == "sqlite"
    assert attributes["db.operation.name"] == "SELECT"
    assert attributes["db.collection.name"] == "books"
    assert attributes["db.namespace"].endswith("library.db")
    assert "IN (" in attributes["db.query.text"] and "author-" not in attributes["db.query.text"]
    duration = sample(
        "db_client_operation_duration_seconds_count",
        db_system_name="sqlite",
        db_operation_name="SELECT",
        db_collection_name="books",
        error_type="",
    )
    assert duration == 1


def test_lazy_loading_in_a_loop_is_reported_as_n_plus_one_and_eager_loading_is_not(library, capfd) -> None:
    """The lazy route: span event, warning log line with statement and count, counter; the eager twin: none."""
    client, _engine, traces = library()
    capfd.readouterr()
    assert client.get("/authors/lazy").status_code == 200
    assert client.get("/authors/eager").status_code == 200
    spans = {span["name"]: span for span in finished_spans(traces) if span["name"].startswith("GET ")}
    (event_,) = spans["GET /authors/lazy"]["events"]
    assert event_["name"] == N_PLUS_ONE_EVENT
    attributes = {item["key"]: next(iter(item["value"].values())) for item in event_["attributes"]}
    assert attributes["spyglass.db.query.count"] in (AUTHORS, str(AUTHORS))
    assert "FROM books" in attributes["db.query.text"]
    assert not spans["GET /authors/eager"].get("events")

    warnings = [line for line in log_lines(capfd) if line.get("logger") == "spyglass.db"]
    (warning,) = warnings
    assert warning["level"] == "warning"
    assert warning["count"] == AUTHORS and "FROM books" in warning["statement"]
    assert warning["http_route"] == "/authors/lazy"
    assert warning["trace_id"] == spans["GET /authors/lazy"]["traceId"]

    lazy = {"http_request_method": "GET", "http_route": "/authors/lazy"}
    eager = {"http_request_method": "GET", "http_route": "/authors/eager"}
    assert sample("spyglass_db_n_plus_one_requests_total", **lazy) == 1
    assert sample("spyglass_db_n_plus_one_requests_total", **eager) == 0
    assert sample("spyglass_db_queries_per_request_sum", **lazy) == 1 + AUTHORS
    assert sample("spyglass_db_queries_per_request_sum", **eager) == 2
    assert sample("spyglass_db_queries_per_request_count", **eager) == 1


def test_a_request_that_runs_no_statement_adds_no_query_count(library) -> None:
    """Queries per request are observed for requests that ran SQL; a request without any is not counted as 0."""
    client, _engine, _traces = library()
    for path in ("/health", "/authors/eager", "/health"):
        assert client.get(path).status_code == 200
    route = {"http_request_method": "GET", "http_route": "/health"}
    assert sample("spyglass_db_queries_per_request_count", **route) == 0
    eager = {"http_request_method": "GET", "http_route": "/authors/eager"}
    assert sample("spyglass_db_queries_per_request_count", **eager) == 1
    assert sample("spyglass_db_queries_per_request_sum", **eager) == 2


def test_a_failed_statement_marks_its_span_and_duration_with_the_error(library) -> None:
    """error.type on the span (status ERROR) and on the duration's labels; the request itself is a 500."""
    client, _engine, traces = library()
    assert client.get("/broken").status_code == 500
    (failed,) = [span for span in finished_spans(traces) if span["name"] == "SELECT no_such_table"]
    assert failed["attributes"]["error.type"] == "sqlite3.OperationalError"
    assert failed["status"]["code"] == 2
    assert [event_["name"] for event_ in failed["events"]] == ["exception"]
    labels = {
        "db_system_name": "sqlite",
        "db_operation_name": "SELECT",
        "db_collection_name": "no_such_table",
        "error_type": "sqlite3.OperationalError",
    }
    assert sample("db_client_operation_duration_seconds_count", **labels) == 1


def test_threshold_zero_turns_n_plus_one_detection_off_and_one_is_refused(library, capfd) -> None:
    """SPYGLASS_DB_N_PLUS_ONE_THRESHOLD=0: no report; 1 would flag every request, so it is a clear error."""
    with pytest.raises(ConfigError, match="SPYGLASS_DB_N_PLUS_ONE_THRESHOLD"):
        load_settings({"SPYGLASS_DB_N_PLUS_ONE_THRESHOLD": "1"})
    client, _engine, traces = library(SPYGLASS_DB_N_PLUS_ONE_THRESHOLD="0")
    capfd.readouterr()
    assert client.get("/authors/lazy").status_code == 200
    (request,) = [span for span in finished_spans(traces) if span["name"] == "GET /authors/lazy"]
    assert not request.get("events")
    assert not [line for line in log_lines(capfd) if line.get("logger") == "spyglass.db"]
    lazy = {"http_request_method": "GET", "http_route": "/authors/lazy"}
    assert sample("spyglass_db_queries_per_request_sum", **lazy) == 1 + AUTHORS


def test_an_engine_instrumented_directly_and_through_the_engine_class_is_traced_once(library) -> None:
    """`instrument_sqlalchemy(engine)` plus a second set of listeners: one span, one count per statement."""
    client, engine, traces = library()
    shared = SqlAlchemyInstrumentation()
    shared.listen(engine)
    try:
        assert client.get("/authors/eager").status_code == 200
    finally:
        for name, listener in shared._listeners():
            event.remove(engine, name, listener)
    names = [span["name"] for span in finished_spans(traces)]
    assert names.count("SELECT books") == 1
    eager = {"http_request_method": "GET", "http_route": "/authors/eager"}
    assert sample("spyglass_db_queries_per_request_sum", **eager) == 2
    books = {"db_system_name": "sqlite", "db_operation_name": "SELECT", "db_collection_name": "books", "error_type": ""}
    assert sample("db_client_operation_duration_seconds_count", **books) == 1


def test_statements_outside_any_request_are_traced_but_not_tallied(library) -> None:
    """A script or startup query gets its span and duration; no request is charged for it."""
    _client, engine, traces = library()
    with Session(engine) as session:
        session.scalars(select(Author)).all()
    assert [span["name"] for span in finished_spans(traces)].count("SELECT authors") == 1
    assert sample("spyglass_db_queries_per_request_count", http_request_method="GET", http_route="<unmatched>") == 0


@pytest.mark.parametrize(
    ("statement", "operation", "collection", "name"),
    [
        ("SELECT a FROM products WHERE id = ?", "SELECT", "products", "SELECT products"),
        ('select * from "Order Lines" join x on 1', "SELECT", "Order Lines", "SELECT Order Lines"),
        ("/* tag */ INSERT INTO shop.orders (id) VALUES (%(id)s)", "INSERT", "shop.orders", "INSERT shop.orders"),
        ("UPDATE stock SET n = n - 1", "UPDATE", "stock", "UPDATE stock"),
        ("DELETE FROM carts", "DELETE", "carts", "DELETE carts"),
        ("CREATE TABLE IF NOT EXISTS products (id INTEGER)", "CREATE", "products", "CREATE products"),
        ("WITH recent AS (SELECT 1) SELECT * FROM recent", "WITH", "", "WITH"),
        ("   ", "", "", "sqlite"),
    ],
)
def test_operation_and_table_come_from_the_statement_text(statement, operation, collection, name) -> None:
    """The conventions' db.operation.name, db.collection.name (first table) and span name."""
    described = describe_statement(statement, "sqlite")
    assert (described.operation, described.collection, described.span_name) == (operation, collection, name)


def test_a_database_that_is_down_fails_the_query_not_the_instrumentation(tmp_path: Path) -> None:
    """Connecting to a missing database file directory raises the driver's error to the caller, unchanged."""
    runtime.init(load_settings({"SPYGLASS_METRICS_PORT": "0", "OTEL_TRACES_EXPORTER": "none"}))
    try:
        engine = spyglass.instrument_sqlalchemy(create_engine(f"sqlite:///{tmp_path}/missing/dir/x.db"))
        with pytest.raises(OperationalError), engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        runtime.shutdown()
