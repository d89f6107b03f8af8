"""Mutual TLS for links: every node presents a certificate signed by the deployment's CA and verifies its peer's.

``TlsConfig(cert, key, ca)`` loads the files once and holds the two contexts a node needs: ``server`` for the
connections it accepts, ``client`` for the ones it makes (a head to every stage, a stage to the next one).

Hostnames are not checked. Peers are addressed by IP on a LAN, often by DHCP, and a certificate naming each
address would break whenever one changes. The CA is private to the deployment, so a certificate it signed is
what makes a peer a member; the handshake after TLS still checks the model fingerprint and the stage index.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import final

from flowspec.errors import AuthError, ConfigError, FlowSpecError, StageFailed

__all__ = ["TlsConfig", "tls_error"]

# OpenSSL's reason codes for the mistakes a deployment makes, as the connecting side sees them (asyncio's server
# drops a failed TLS handshake before flowspec sees it), in words that say which end to fix.
_REASONS = {
    "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not signed by this node's CA (--tls-ca)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this node's certificate (not signed by the peer's CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected this node's certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a certificate and this node sent none",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS; start every node with --tls-cert/--tls-key/--tls-ca, "
                            "or none",
}


def tls_error(what: str, exc: ssl.SSLError) -> FlowSpecError:
    """``exc`` in words that say which end to fix (OpenSSL's own in brackets): an ``AuthError`` for the
    mistakes above (the peer is refused, as for a wrong secret), a ``StageFailed`` for anything else."""
    detail = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else None
    detail = detail or exc.reason or str(exc)
    hint = _REASONS.get(exc.reason or "")
    if hint is None:
        return StageFailed(f"{what}: TLS error [{detail}]")
    return AuthError(f"{what}: TLS handshake failed: {hint} [{detail}]")


@final
@dataclass(frozen=True)
class TlsConfig:
    """This node's certificate and key and the deployment's CA certificate (PEM files)."""

    cert: str | os.PathLike[str]
    key: str | os.PathLike[str]
    ca: str | os.PathLike[str]
    server: ssl.SSLContext = field(init=False, repr=False, compare=False)  # for accepted connections
    client: ssl.SSLContext = field(init=False, repr=False, compare=False)  # for connections this node makes

    def __post_init__(self) -> None:
        # built once, here: bad files fail at startup with the flag's file named, not at the first connection
        object.__setattr__(self, "server", self._context(server_side=True))
        object.__setattr__(self, "client", self._context(server_side=False))

    def _context(self, *, server_side: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # by IP on a LAN: the CA decides membership (module docstring)
        ctx.verify_mode = ssl.CERT_REQUIRED  # both ends: the server asks for the client's certificate
        if server_side:
            # (OpenSSL's default) sent once the client's certificate is accepted: a connecting node that sees the
            # stage hang up with no ticket knows its certificate was refused (net/link.py, _closed_before_hello)
            ctx.num_tickets = 2
        try:
            ctx.load_cert_chain(self.cert, self.key, password=self._no_password)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"cannot load the TLS certificate {os.fspath(self.cert)!r} with the key "
                              f"{os.fspath(self.key)!r}: {_why(exc)}") from exc
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the TLS CA certificate {os.fspath(self.ca)!r}: {_why(exc)}") from exc
        return ctx

    def _no_password(self) -> bytes:
        # instead of OpenSSL's prompt on the terminal, which would hang a stage started as a service
        raise ConfigError(f"the TLS key {os.fspath(self.key)!r} is encrypted; give flowspec an unencrypted key "
                          f"(e.g. `openssl pkey -in {os.fspath(self.key)} -out plain.key`) readable only by its user")


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not a PEM certificate/key, or the key does not match [{exc.reason or exc}]"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
