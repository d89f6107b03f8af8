"""Safe by default: a stage refuses to listen on a non-loopback address without a shared secret, before it binds
or loads anything; --insecure (or a secret, or TLS) gets past that check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowspec.cli.node import node_parser
from flowspec.cli.options import tls_config
from flowspec.errors import ConfigError
from tests.net.tls_certs import make_ca, make_leaf


def node(tmp_path: Path, *extra: str, secret: str | None = None) -> subprocess.CompletedProcess[str]:
    peers = tmp_path / "peers.txt"
    peers.write_text("10.0.0.1:7000  # head\n10.0.0.1:7001\n")
    env = {k: v for k, v in os.environ.items() if k != "FLOWSPEC_SECRET"}
    if secret is not None:
        env["FLOWSPEC_SECRET"] = secret
    cmd = [sys.executable, "-m", "flowspec.cli.node", "--peers", str(peers), "--index", "1",
           "--model", str(tmp_path / "no-such-model"), "--cache-dir", str(tmp_path / "cache"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_non_loopback_without_secret_is_refused_before_binding(tmp_path: Path) -> None:
    out = node(tmp_path)
    assert out.returncode == 2, out
    assert "without a shared secret" in out.stderr and "--insecure" in out.stderr, out.stderr
    assert "FLOWSPEC_SECRET" in out.stderr
    assert not (tmp_path / "cache").exists()  # it stopped before looking for the model


@pytest.mark.parametrize(("extra", "secret"), [(("--insecure",), None), ((), "a-long-enough-shared-secret")])
def test_insecure_or_a_secret_passes_the_check(tmp_path: Path, extra: tuple[str, ...], secret: str | None) -> None:
    out = node(tmp_path, *extra, secret=secret)
    assert out.returncode == 2, out  # it goes on, and fails on the next check: 10.0.0.1 is not this machine's
    assert "without a shared secret" not in out.stderr, out.stderr
    assert "cannot listen on 10.0.0.1:7001" in out.stderr, out.stderr


def test_tls_passes_the_check(tmp_path: Path) -> None:
    """Mutual TLS authenticates peers as a shared secret does; its files are loaded before the model is."""
    ca = make_ca(tmp_path / "pki", "ca")
    leaf = make_leaf(tmp_path / "pki", "stage-1", ca)
    out = node(tmp_path, "--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key), "--tls-ca", str(leaf.ca))
    assert out.returncode == 2, out
    assert "without a shared secret" not in out.stderr, out.stderr
    assert "cannot listen on 10.0.0.1:7001" in out.stderr, out.stderr  # the next check, past the secret's


def test_tls_flags_come_together_and_bad_files_are_named(tmp_path: Path) -> None:
    args = node_parser().parse_args(["--peers", "p", "--index", "1", "--model", "m", "--tls-cert", "a.pem"])
    with pytest.raises(ConfigError, match="together; missing --tls-key, --tls-ca"):
        tls_config(args)
    args.tls_key, args.tls_ca = "a.key", "ca.pem"
    with pytest.raises(ConfigError, match="cannot load the TLS certificate 'a.pem' with the key 'a.key'"):
        tls_config(args)
