"""Configuration, parsed and validated once: the peers file and the secret (with line-numbered errors), and
`ClusterConfig`, the one frozen object a head's cluster is built from (by the CLI's flags or the API's keywords),
with one default for each setting.

    # peers.txt: one host:port per line in pipeline order, the head (D0) first
    192.168.1.10:7000
    192.168.1.11:7001  layers=8
    192.168.1.12:7001  layers=8
    192.168.1.13:7001  layers=7  device=cpu quant=int4

Options: `layers=N` (how many target layers this stage holds; give it on every stage or on none, for a
balanced split), `standby=host:port[,host:port]` (standby nodes serving the same layers: started with
`flowspec-node --index K --listen host:port`, they take over when the stage is lost), and per device
`device=auto|cpu|cuda|cuda:N`, `dtype=auto|float32|float16|bfloat16`, `quant=none|int8|int4` (override the
`--device/--dtype/--quant` flags for that line; the head's line sets the head's lm_head and drafter).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from flowspec.bounds import check, seconds
from flowspec.errors import ConfigError
from flowspec.model.precision import DEFAULT_GROUP_SIZE
from flowspec.net import MAX_REQUESTS, Timeouts
from flowspec.net.link import format_address

__all__ = ["HEARTBEAT_TIMEOUT_S", "RECOVERY_TIMEOUT_S", "STEP_TIMEOUT_S", "ClusterConfig", "Peer", "Peers",
           "load_secret", "parse_peers", "read_peers", "read_text_file", "split_address"]

# The pipeline's deadlines, one default each (the CLI's flags, the API and every node read them here).
HEARTBEAT_TIMEOUT_S = Timeouts().heartbeat_timeout  # silence before a peer is dead (net/link.py says why)
STEP_TIMEOUT_S = 60.0  # no progress this long with heartbeats flowing: a stage is stalled (a Pi's long prefill
# takes tens of seconds per stage)
RECOVERY_TIMEOUT_S = 30.0  # how long a stage that is not up yet, or was lost, is waited for

_OPTIONS = ("layers", "standby", "device", "dtype", "quant")
_CHOICES = {"dtype": ("auto", "float32", "float16", "bfloat16"), "quant": ("none", "int8", "int4")}


@dataclass(frozen=True, slots=True)
class Peer:
    host: str
    port: int
    line: int = 0
    options: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def standbys(self) -> list[tuple[str, int]]:
        text = self.options.get("standby", "")
        return [split_address(a, self.line, "<standby>") for a in text.split(",") if a]

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class Peers:
    head: Peer
    stages: tuple[Peer, ...]  # V1..VN
    source: str = "<peers>"

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage(self, index: int) -> Peer:
        if not 1 <= index <= self.num_stages:
            raise ConfigError(f"{self.source}: --index {index} is not a stage; use 1..{self.num_stages} "
                              "(line 1 is the head)")
        return self.stages[index - 1]

    @property
    def layers(self) -> list[int] | None:
        """Per-stage layer counts when the file gives them, None for a balanced split."""
        given = [p.options.get("layers") for p in self.stages]
        if not any(given):
            return None
        missing = [p.line for p, g in zip(self.stages, given) if not g]
        if missing:
            raise ConfigError(f"{self.source}: layers= is given on some stages but not on lines {missing}; "
                              "give it on every stage line or on none")
        return [int(g) for g in given if g]


def split_address(address: str, line: int, source: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{source}:{line}: expected host:port, got {address!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{source}:{line}: port must be 1..65535, got {port_text!r}")
    return host.strip("[]"), int(port_text)  # [::1]:7000


def _parse_line(text: str, line: int, source: str) -> Peer:
    fields = text.split()
    options: dict[str, str] = {}
    host, port = split_address(fields[0], line, source)
    for option in fields[1:]:
        key, eq, value = option.partition("=")
        if not eq or key not in _OPTIONS or not value:
            raise ConfigError(f"{source}:{line}: unknown option {option!r}; known: "
                              + ", ".join(f"{k}=..." for k in _OPTIONS))
        if key == "layers" and (not value.isdigit() or int(value) < 1):
            raise ConfigError(f"{source}:{line}: layers must be a positive integer, got {value!r}")
        if key == "standby":
            for address in value.split(","):
                split_address(address, line, source)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{source}:{line}: {key}={value} is not one of {', '.join(_CHOICES[key])}")
        if key == "device" and value not in ("auto", "cpu", "cuda") and not (
                value.startswith("cuda:") and value[5:].isdigit()):
            raise ConfigError(f"{source}:{line}: device={value}: use auto, cpu, cuda or cuda:N")
        options[key] = value
    return Peer(host, port, line, options)


def parse_peers(text: str, source: str = "<peers>") -> Peers:
    peers: list[Peer] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        content = raw.split("#", 1)[0].strip()
        if content:
            peers.append(_parse_line(content, number, source))
    if len(peers) < 2:
        raise ConfigError(f"{source}: needs at least two lines (the head, then one stage or more); "
                          f"found {len(peers)}")
    seen: dict[tuple[str, int], Peer] = {}
    for peer in peers[1:]:
        for ip in _resolved(peer.host):
            earlier = seen.get((ip, peer.port))
            if earlier is not None:
                same = "" if earlier.host == peer.host else f" (as {earlier.address}, both {format_address(ip, peer.port)})"
                raise ConfigError(f"{source}:{peer.line}: {peer.address} is already stage line {earlier.line}{same}")
            seen[(ip, peer.port)] = peer
    for key in ("layers", "standby"):
        if key in peers[0].options:
            raise ConfigError(f"{source}:{peers[0].line}: the head holds no target layers; drop {key}= there")
    return Peers(peers[0], tuple(peers[1:]), source)


def _resolved(host: str) -> set[str]:
    """The IP addresses a host name stands for (so `localhost` and `127.0.0.1` are one address); the name itself
    when it does not resolve here (it may on the devices)."""
    try:
        return {ipaddress.ip_address(host).compressed}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return {host.lower()}
    return {ipaddress.ip_address(str(info[4][0]).split("%")[0]).compressed for info in infos}


def read_peers(path: str | os.PathLike[str]) -> Peers:
    p = Path(path)
    return parse_peers(read_text_file(p, "peers file"), str(p))


def read_text_file(path: str | os.PathLike[str], what: str) -> str:
    """A UTF-8 text file the user named (a peers file, a prompt file), or one ConfigError saying why not."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                          "save it as UTF-8") from exc


def load_secret(secret_file: str | None = None) -> bytes | None:
    """The shared secret: from --secret-file, else $FLOWSPEC_SECRET, else none."""
    if secret_file:
        try:
            data = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {secret_file}: {exc.strerror or exc}") from exc
        if not data:
            raise ConfigError(f"secret file {secret_file} is empty")
        return data
    env = os.environ.get("FLOWSPEC_SECRET", "").strip()
    return env.encode() if env else None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How a head runs its pipeline: built once from flags (flowspec.cli.options.cluster_config) or the API's
    keywords (`Cluster.connect(..., model=...)`), checked as it is built, frozen. Where the stages are (a peers
    file, or local processes) and how to reach them (secret, TLS) are given beside it."""

    model: str
    draft: str | None = None  # a model sharing the target's tokenizer, self, self:layers=N, random
    cache_dir: str | None = None
    device: str = "auto"  # every part's number format, unless its peers line says otherwise
    dtype: str = "auto"
    quant: str = "none"
    group_size: int = DEFAULT_GROUP_SIZE
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S
    step_timeout: float = STEP_TIMEOUT_S
    recovery_timeout: float = RECOVERY_TIMEOUT_S  # 0: a lost stage fails its requests at once
    max_requests: int = MAX_REQUESTS  # requests generated at once (a stage serves at most MAX_REQUESTS)
    timeouts: Timeouts | None = None  # every link deadline, for callers who tune them; else from the heartbeat

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("a model is needed: pass model= (a name from `flowspec models list`, or a folder)")
        seconds(self.heartbeat_timeout, "heartbeat_timeout")
        seconds(self.step_timeout, "step_timeout")
        seconds(self.recovery_timeout, "recovery_timeout", zero=True)
        check(self.max_requests, "max_requests", 1, MAX_REQUESTS, whole=True)

    @classmethod
    def build(cls, base: ClusterConfig | None = None, **settings: Any) -> ClusterConfig:
        """`base` (or the defaults) with `settings` (field -> value) applied; an unknown name is refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"unknown cluster setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if base is None:
            return cls(**settings)
        return replace(base, **settings)

    @property
    def link_timeouts(self) -> Timeouts:
        """The head's link deadlines (and the stages' heartbeat, for local stages)."""
        return self.timeouts or Timeouts.for_heartbeat(self.heartbeat_timeout)

    def stage_args(self) -> list[str]:
        """What every local stage process is started with, so that it runs as this head expects."""
        return ["--device", self.device, "--dtype", self.dtype, "--quant", self.quant,
                "--group-size", str(self.group_size),
                "--heartbeat-timeout", repr(self.link_timeouts.heartbeat_timeout)]
