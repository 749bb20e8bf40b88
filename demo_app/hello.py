"""A minimal Flask service instrumented the way a user would: one import at the top.

Routes exercise what the instrumentation must get right: a templated route, a handled 4xx, an
unhandled exception (500), a slow response and a streamed body.
"""

import time

from flask import Flask, Response, abort, jsonify, request

import spyglass
import spyglass.auto

app = Flask(__name__)
log = spyglass.get_logger("demo_app.hello")


@app.get("/")
def hello() -> str:
    return "hello"


@app.get("/users/<int:user_id>")
def user(user_id: int) -> Response:
    log.info("user looked up", user_id=user_id)
    if user_id == 0:
        abort(404)
    return jsonify(id=user_id, name=f"user-{user_id}")


@app.post("/login")
def login() -> Response:
    payload = request.get_json(silent=True) or {}
    log.info("login attempt", username=payload.get("username"), password=payload.get("password"))
    return jsonify(ok=True)


@app.get("/fail")
def fail() -> str:
    raise RuntimeError("the handler failed on purpose")


@app.get("/slow")
def slow() -> str:
    time.sleep(float(request.args.get("seconds", "0.2")))
    return "slow"


@app.get("/stream")
def stream() -> Response:
    def chunks():
        for index in range(3):
            yield f"chunk {index}\n"

    return Response(chunks(), mimetype="text/plain")


@app.get("/healthz")
def healthz() -> str:
    return "ok"
