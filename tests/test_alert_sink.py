"""The alert sink keeps Alertmanager's webhook notifications for people and tests to read."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests

from demo_app.alert_sink import AlertSink, serve


@pytest.fixture
def sink() -> Iterator[tuple[str, list[dict]]]:
    logged: list[dict] = []
    server = serve("127.0.0.1", 0, AlertSink(keep=3, log=logged.append))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", logged
    server.shutdown()
    server.server_close()


def notification(alertname: str, status: str = "firing") -> dict:
    alert = {"status": status, "labels": {"alertname": alertname, "severity": "critical"}, "annotations": {}}
    return {"version": "4", "status": status, "alerts": [alert], "commonLabels": alert["labels"]}


def test_notifications_are_kept_per_receiver_and_logged_per_alert(sink: tuple[str, list[dict]]) -> None:
    """Each POST to /webhook/<receiver> is kept with its receiver; GET filters by receiver; one log line per alert."""
    url, logged = sink
    assert requests.post(f"{url}/webhook/page", json=notification("A"), timeout=5).status_code == 200
    assert requests.post(f"{url}/webhook/ticket", json=notification("B", "resolved"), timeout=5).status_code == 200
    everything = requests.get(f"{url}/notifications", timeout=5).json()
    assert [(n["receiver"], n["payload"]["commonLabels"]["alertname"]) for n in everything] == [
        ("page", "A"),
        ("ticket", "B"),
    ]
    paged = requests.get(f"{url}/notifications", params={"receiver": "page"}, timeout=5).json()
    assert [n["payload"]["status"] for n in paged] == ["firing"]
    assert [(line["receiver"], line["alertname"], line["status"]) for line in logged] == [
        ("page", "A", "firing"),
        ("ticket", "B", "resolved"),
    ]
    assert requests.delete(f"{url}/notifications", timeout=5).ok
    assert requests.get(f"{url}/notifications", timeout=5).json() == []


def test_only_the_most_recent_notifications_are_kept(sink: tuple[str, list[dict]]) -> None:
    """Memory stays bounded: past --keep, the oldest notification goes."""
    url, _ = sink
    for name in "ABCD":
        requests.post(f"{url}/webhook/page", json=notification(name), timeout=5).raise_for_status()
    kept = requests.get(f"{url}/notifications", timeout=5).json()
    assert [n["payload"]["commonLabels"]["alertname"] for n in kept] == ["B", "C", "D"]


def test_bad_requests_get_a_clear_error_and_keep_nothing(sink: tuple[str, list[dict]]) -> None:
    """Not JSON, not an object, or a bad path: a 4xx with a message, and nothing is kept."""
    url, _ = sink
    not_json = requests.post(f"{url}/webhook/page", data=b"{oops", timeout=5)
    assert not_json.status_code == 400 and "webhook notification" in not_json.json()["error"]
    assert requests.post(f"{url}/webhook/page", json=[1, 2], timeout=5).status_code == 400
    assert requests.post(f"{url}/webhook/../etc", json={}, timeout=5).status_code == 404
    assert requests.post(f"{url}/elsewhere", json={}, timeout=5).status_code == 404
    assert requests.get(f"{url}/notifications", timeout=5).json() == []
    assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
