"""Reading what proves a node is a member: the cluster key file and the TLS files.

Every failure is a ConfigError that names the flag and the file, so ``gossipnode run`` and
``gossipnode merge`` exit with a message that says what to fix.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from gossipnode import auth
from gossipnode.config import ConfigError
from gossipnode.transport import Tls

log = logging.getLogger("gossipnode.credentials")


@dataclass(frozen=True)
class Credentials:
    key: bytes | None = None  # the cluster key; None: no challenge-response
    tls: Tls | None = None  # mutual TLS contexts; None: plain TCP

    @property
    def insecure(self) -> bool:
        return self.key is None and self.tls is None


def load(
    cluster_key: Path | None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> Credentials:
    key = load_key(cluster_key) if cluster_key is not None else None
    tls = None
    if tls_cert is not None and tls_key is not None and tls_ca is not None:
        try:
            tls = Tls.load(str(tls_cert), str(tls_key), str(tls_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--tls-cert/--tls-key/--tls-ca: cannot use {tls_cert}, {tls_key} and "
                f"{tls_ca}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
    return Credentials(key, tls)


def load_key(path: Path) -> bytes:
    """The cluster key in ``path``; warns if others may read the file."""
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"--cluster-key: no such file {path} (make one with gossipnode keygen --out {path})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--cluster-key: cannot read {path}: {exc}") from None
    try:
        key = auth.parse_key(text)
    except auth.BadKey as exc:
        raise ConfigError(f"--cluster-key: {path} {exc}") from None
    if mode & 0o077:
        log.warning("%s can be read by other users: chmod 600 it", path)
    return key


def write_key(path: Path) -> None:
    """A new cluster key in ``path`` (mode 600); refuses to overwrite one."""
    try:
        # Created private, never readable by others even for a moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(auth.new_key())
    except FileExistsError:
        raise ConfigError(f"--out: {path} exists; remove it first to make a new key") from None
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {path}: {exc.strerror}") from None
