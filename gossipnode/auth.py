"""Proving that both ends of a connection hold the cluster key. Pure: no I/O.

Before anything else on a connection (the ids are the frames' ``sender`` fields)::

    dialer                              listener
    Challenge(nonce_d)               ->
                                     <- Response(nonce_l, proof("listener"))
    Proof(proof("dialer"))           ->
    Hello ...                           (then as without a key)

    proof(role) = HMAC-SHA256(key, role | nonce_d | nonce_l | dialer id | listener id)

Each side's proof covers the other side's fresh nonce, so a recorded proof never verifies
again (no replay); the role keeps a listener's proof from being reflected back as a dialer's;
the ids bind it to who claims to talk, and a connection refuses a later frame with another
sender id. This admits members; it does not encrypt (mutual TLS does, and can be combined).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

KEY_BYTES = 32  # what ``gossipnode keygen`` makes
MIN_KEY_BYTES = 16
NONCE_BYTES = 16
PROOF_BYTES = 32  # SHA-256
DIALER = b"gossipnode dialer"
LISTENER = b"gossipnode listener"


class BadKey(ValueError):
    """A cluster key file's text is not a key; the message says what is wrong."""


def new_key() -> str:
    """A fresh cluster key, as the text of a key file (hex and a newline)."""
    return secrets.token_hex(KEY_BYTES) + "\n"


def parse_key(text: str) -> bytes:
    """The key in a key file's ``text``: hex digits, surrounding whitespace ignored."""
    digits = text.strip()
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        raise BadKey("is not a key: expected hex digits (gossipnode keygen makes one)") from None
    if len(key) < MIN_KEY_BYTES:
        raise BadKey(f"holds {len(key)} bytes; a key has at least {MIN_KEY_BYTES}")
    return key


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(
    key: bytes, role: bytes, dialer_nonce: bytes, listener_nonce: bytes, dialer: int, listener: int
) -> bytes:
    ids = struct.pack(">qq", dialer, listener)
    return hmac.new(key, role + dialer_nonce + listener_nonce + ids, hashlib.sha256).digest()


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
