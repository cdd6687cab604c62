"""What a node shows of itself over HTTP: ``/metrics`` (Prometheus text) and ``/status``
(JSON). Rendering is pure, from the node's ``status()`` record; the server is a small trio
loop that answers one GET per connection, bounded in size and time.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from gossipnode.transport import Address

PREFIX = "gossipnode_"
MAX_REQUEST = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0

Route = Callable[[], tuple[str, bytes]]  # -> (content type, body)


class MetricsError(Exception):
    """The metrics server could not listen; the message says why."""


def metrics_text(status: dict[str, Any]) -> str:
    """The Prometheus exposition of a node's ``status()``: counters end in ``_total``, in base
    units (seconds, bytes)."""
    stats = status["stats"]
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {PREFIX}{name} {help_}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        suffix = "_total" if kind == "counter" else ""
        lines.extend(f"{PREFIX}{name}{suffix}{labels} {_number(v)}" for labels, v in samples)

    metric("gradients", "counter", "Gradient steps applied.", [("", stats["gradients"])])
    metric(
        "bad_gradients", "counter", "Non-finite gradients skipped.", [("", stats["bad_gradients"])]
    )
    metric(
        "exchanges",
        "counter",
        "Gossip events by outcome.",
        [(f'{{outcome="{k}"}}', v) for k, v in stats["exchanges"].items()],
    )
    metric(
        "rejected_connections",
        "counter",
        "Inbound connections dropped for bad input (handshakes included).",
        [("", stats["exchanges"].get("rejected", 0))],
    )
    metric(
        "handshake_failures",
        "counter",
        "Inbound connections that did not authenticate and say Hello in time.",
        [("", stats["handshake_failures"])],
    )
    metric(
        "connections_over_limit",
        "counter",
        "Inbound connections closed at once because --max-connections were open.",
        [("", stats["over_limit"])],
    )
    metric("sent_bytes", "counter", "Bytes sent.", [("", stats["bytes_sent"])])
    by_peer = status["by_peer"]
    metric(
        "peer_sent_bytes",
        "counter",
        "Bytes sent to each node.",
        [(f'{{peer="{node}"}}', b["sent"]) for node, b in by_peer.items()],
    )
    metric(
        "peer_received_bytes",
        "counter",
        "Bytes received from each node.",
        [(f'{{peer="{node}"}}', b["received"]) for node, b in by_peer.items()],
    )
    metric("received_bytes", "counter", "Bytes received.", [("", stats["bytes_received"])])
    metric(
        "peer_exchanges",
        "counter",
        "Exchanges this node initiated and completed, by peer.",
        [(f'{{peer="{node}"}}', b["exchanges"]) for node, b in by_peer.items()],
    )
    metric("uptime_seconds", "gauge", "Seconds since the node started.", [("", status["elapsed"])])
    metric(
        "peers_connected",
        "gauge",
        "Neighbours with an open connection.",
        [("", sum(p["connected"] for p in status["peers"]))],
    )
    metric(
        "staleness_mean",
        "gauge",
        "Mixes applied during a gradient.",
        [("", stats["staleness_mean"])],
    )
    if stats["train_loss"] is not None:
        metric(
            "train_loss",
            "gauge",
            "Moving average of the training loss.",
            [("", stats["train_loss"])],
        )
    if stats["consensus_estimate"] is not None:
        metric(
            "consensus_distance_estimate",
            "gauge",
            "Half the mean squared distance to the neighbours' models at the latest exchanges.",
            [("", stats["consensus_estimate"])],
        )
    if status["members"] is not None:
        counts = Counter(m["status"] for m in status["members"]["others"])
        metric(
            "members",
            "gauge",
            "Other members of the cluster known to this node, by status.",
            [(f'{{status="{k}"}}', counts[k]) for k in ("alive", "suspect", "dead")],
        )
        metric(
            "incarnation",
            "gauge",
            "This node's incarnation (raised to refute suspicions).",
            [("", status["members"]["self"]["incarnation"])],
        )
    for key, value in status["evaluation"].items():
        metric(f"eval_{key}", "gauge", f"Held-out {key} at the last evaluation.", [("", value)])
    return "\n".join(lines) + "\n"


def status_json(status: dict[str, Any]) -> bytes:
    return (json.dumps(status, indent=1) + "\n").encode()


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if value.is_integer() else repr(value)


def routes_for(status: Callable[[], dict[str, Any]]) -> dict[str, Route]:
    return {
        "/metrics": lambda: ("text/plain; version=0.0.4", metrics_text(status()).encode()),
        "/status": lambda: ("application/json", status_json(status())),
    }


async def serve_http(
    listen: Address,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GETs for ``routes`` on ``listen`` until cancelled; reports the bound port."""
    try:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as exc:
        raise MetricsError(exc.strerror or str(exc)) from None
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream: trio.SocketStream) -> None:
        await _answer(stream, routes)

    await trio.serve_listeners(handler, listeners)


async def _answer(stream: trio.abc.Stream, routes: dict[str, Route]) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk or len(request) + len(chunk) > MAX_REQUEST:
                    return
                request += chunk
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0].decode(errors="replace").split("?", 1)[0]
            if method != b"GET":
                code, kind, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path not in routes:
                code, kind, body = "404 Not Found", "text/plain", b"try /metrics or /status\n"
            else:
                code, (kind, body) = "200 OK", routes[path]()
            head = (
                f"HTTP/1.0 {code}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(head.encode() + body)
