"""The app the tests run under gunicorn: instrumented only by ``import spyglass.auto``."""

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
