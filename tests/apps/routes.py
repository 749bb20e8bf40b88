"""An app of ``SERIES_ROUTES`` routes (default 4) for counting series: instrumented by ``import spyglass.auto``.

Route ``/r<n>/<int:item>`` answers GET, POST and PUT (:data:`METHODS`) with the status the ``status``
query parameter names, so a client chooses every (method, route, status) combination it creates.
"""

import spyglass.auto  # noqa: F401, I001 - first, as the docs say

import os

from flask import Flask, request

METHODS = ("GET", "POST", "PUT")

app = Flask(__name__)


def _answer(item: int) -> tuple[str, int]:
    return f"{item}\n", int(request.args.get("status", "200"))


for _number in range(int(os.environ.get("SERIES_ROUTES", "4"))):
    app.add_url_rule(f"/r{_number}/<int:item>", f"route{_number}", _answer, methods=list(METHODS))
