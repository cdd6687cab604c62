"""Delay packets without netem: a userspace NFQUEUE delayer over a raw netlink socket.

``python -m gossipnode.nfqueue --queue Q --ms D --seconds S`` binds NFQUEUE ``Q`` (an
``iptables ... -j NFQUEUE --queue-num Q --queue-bypass`` rule sends packets to it), holds each
packet ``D`` milliseconds, accepts it, and prints "ready" once bound. After ``S`` seconds, or
on SIGTERM/SIGINT, it accepts everything it holds and exits; with ``--queue-bypass``, packets
then pass undelayed. ``netns.NetnsCluster.delay`` runs it in a host's namespace. It reads only
each packet's metadata (linux/netfilter/nfnetlink_queue.h), never its bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import IO

_clock = time.monotonic  # noqa: TID251 - a plain process, no trio: the monotonic clock

# NFQUEUE over a raw netlink socket (linux/netfilter/nfnetlink_queue.h): bind a queue, get
# each packet's id (metadata only, not its bytes), and give the verdict ACCEPT when it is due.

QUEUE = 7
_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_NO_ENOBUFS = 5
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_QUEUE_PACKET, _QUEUE_VERDICT, _QUEUE_CONFIG = 3 << 8 | 0, 3 << 8 | 1, 3 << 8 | 2
_CFG_CMD, _CFG_PARAMS, _CFG_QUEUE_MAXLEN, _CFG_MASK, _CFG_FLAGS = 1, 2, 3, 4, 5
_CMD_BIND, _CMD_UNBIND = 1, 2
_COPY_META = 1
_F_FAIL_OPEN, _F_GSO = 1, 4  # accept when the queue is full; take GSO packets whole
_NFQA_PACKET_HDR, _NFQA_VERDICT_HDR = 1, 2
_NF_ACCEPT = 1


def _attr(kind: int, data: bytes) -> bytes:
    pad = b"\0" * (-len(data) % 4)
    return struct.pack("=HH", 4 + len(data), kind) + data + pad


def _nfq_message(kind: int, queue: int, attrs: bytes, flags: int = 0, family: int = 0) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, _NLM_F_REQUEST | flags, 0, 0) + body


def _nfq_config(sock: socket.socket, queue: int, *attrs: bytes) -> None:
    sock.send(_nfq_message(_QUEUE_CONFIG, queue, b"".join(attrs), _NLM_F_ACK))
    reply = sock.recv(65536)
    (kind,) = struct.unpack_from("=H", reply, 4)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, 16)
        if error:
            raise OSError(-error, f"NFQUEUE {queue}: {os.strerror(-error)}")


def _packet_ids(data: bytes) -> Iterator[int]:
    """The ids of the queued packets in one netlink read."""
    at = 0
    while at + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, at)
        if length < 16:
            return
        if kind == _QUEUE_PACKET:
            a = at + 20  # nlmsghdr, nfgenmsg
            while a + 4 <= at + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x7FFF == _NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", data, a + 4)[0]
                    break
                a += (alen + 3) & ~3
        at += (length + 3) & ~3


def delayer(queue: int, ms: float, seconds: float, ready: IO[str] | None = None) -> int:
    """Hold each packet of NFQUEUE ``queue`` ``ms`` milliseconds, for ``seconds`` at most (or
    until SIGTERM/SIGINT), then accept everything held; returns the packets delayed."""
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.settimeout(5.0)  # for the configuration's acknowledgements
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
    with contextlib.suppress(OSError):
        sock.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
    cmd = struct.pack("=BxH", _CMD_BIND, socket.htons(socket.AF_INET))
    _nfq_config(sock, queue, _attr(_CFG_CMD, cmd))
    _nfq_config(
        sock,
        queue,
        _attr(_CFG_PARAMS, struct.pack("!IB", 0, _COPY_META)),
        _attr(_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536)),
        _attr(_CFG_MASK, struct.pack("!I", _F_FAIL_OPEN | _F_GSO)),
        _attr(_CFG_FLAGS, struct.pack("!I", _F_FAIL_OPEN | _F_GSO)),
    )
    sock.setblocking(False)
    if ready is not None:
        ready.write("ready\n")
        ready.flush()
    held: deque[tuple[float, int]] = deque()  # (due, id): one delay, so due times are in order
    hold, end, count = ms / 1000, _clock() + seconds, 0

    def release(until: float) -> None:
        verdicts = []
        while held and held[0][0] <= until:
            verdict = struct.pack("!II", _NF_ACCEPT, held.popleft()[1])
            verdicts.append(_nfq_message(_QUEUE_VERDICT, queue, _attr(_NFQA_VERDICT_HDR, verdict)))
        if verdicts:
            sock.send(b"".join(verdicts))

    try:
        while not stop and _clock() < end:
            wait = max(0.0, held[0][0] - _clock()) if held else 0.2
            readable, _, _ = select.select([sock], [], [], min(wait, 0.2))
            if readable:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    for _ in range(256):  # then release what is due, then read on
                        data = sock.recv(1 << 20)
                        now = _clock()
                        for packet in _packet_ids(data):
                            held.append((now + hold, packet))
                            count += 1
            release(_clock())
    finally:
        release(math.inf)
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            _nfq_config(sock, queue, _attr(_CFG_CMD, struct.pack("=BxH", _CMD_UNBIND, 0)))
        sock.close()
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gossipnode.nfqueue", description=__doc__)
    parser.add_argument("--queue", type=int, default=QUEUE)
    parser.add_argument("--ms", type=float, required=True, help="delay of each packet")
    parser.add_argument("--seconds", type=float, default=3600.0, help="exit after this long")
    args = parser.parse_args(argv)
    delayer(args.queue, args.ms, args.seconds, ready=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
