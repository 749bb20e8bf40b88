"""The app the tests run under gunicorn: instrumented only by ``import spyglass.auto``."""

import logging
import os

from flask import Flask, abort, jsonify, request

import spyglass
import spyglass.auto

app = Flask(__name__)
log = spyglass.get_logger("tests.shop")


@app.get("/pid")
def pid():
    return jsonify(pid=os.getpid())


@app.get("/items/<int:item_id>")
def item(item_id: int):
    log.info("item looked up", item_id=item_id, api_key="sk-live-123")
    if item_id == 0:
        abort(404)
    return jsonify(id=item_id, pid=os.getpid())


@app.get("/fail")
def fail():
    raise ValueError("failed on purpose")


@app.get("/healthz")
def healthz():
    return "ok"


@app.post("/echo")
def echo():
    payload = request.get_json(silent=True) or {}
    log.info("echo", **{key: value for key, value in payload.items() if isinstance(key, str)})
    return jsonify(payload)


@app.post("/note")
def note():
    """Log what a client sent (user agent, query parameter `q`, body field `text`), via structlog and the stdlib."""
    payload = request.get_json(silent=True)
    text = payload.get("text") if isinstance(payload, dict) else None
    user_agent = request.headers.get("User-Agent", "")
    query = request.args.get("q", "")
    log.info("note", text=text, user_agent=user_agent, q=query)
    logging.getLogger("tests.shop.stdlib").warning("note from %s: %s (%s)", user_agent, text, query)
    return jsonify(ok=True)


@app.post("/login")
def login():
    """Fail with an exception whose message quotes the credentials sent (as careless code does)."""
    payload = request.get_json(silent=True) or {}
    try:
        raise PermissionError(
            f"login rejected for user={payload.get('user')} password={payload.get('password')} "
            f"(retried with Bearer {payload.get('token')})"
        )
    except PermissionError:
        log.exception("login failed")
        raise


_celery_app = None


@app.post("/publish")
def publish():
    """Publish `tasks.ok` to SHOP_BROKER_URL, queue SHOP_QUEUE (no worker needed: the message stays queued)."""
    global _celery_app
    if _celery_app is None:
        import celery

        _celery_app = celery.Celery("shop", broker=os.environ["SHOP_BROKER_URL"])
    result = _celery_app.send_task("tasks.ok", args=(1,), queue=os.environ["SHOP_QUEUE"])
    return jsonify(task_id=result.id)
