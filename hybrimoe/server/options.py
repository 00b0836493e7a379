"""How the server admits and guards requests: one validated `ServerOptions` (no fastapi import, so the
CLI can list the defaults without the server's extras).

Defaults are safe for a server on the loopback interface: Host and Origin checks on, no CORS, a
bounded queue, a body limit derived from the context length, and timeouts on every read.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from urllib.parse import urlsplit

from hybrimoe.engine.batch import DEFAULT_PREFILL_CHUNK
from hybrimoe.errors import ConfigError

DEFAULT_MAX_QUEUE = 16  # requests waiting for the engine (tokenising or queued) beyond the running ones
# Sequences decoded together. 1 = one request at a time, exactly as before batching: a batch of N keeps
# N sequences' KV cache at the full context, memory the operator must choose to spend (on a GPU it
# competes with the expert cache: Mixtral-8x7B at 32k tokens needs 4 GiB per sequence in bf16).
DEFAULT_MAX_BATCH = 1
BODY_BYTES_PER_TOKEN = 32  # derived body limit: JSON-escaped text of a context-filling prompt fits easily
BODY_BYTES_BASE = 64 * 1024  # ... plus room for the other fields
DEFAULT_BODY_TIMEOUT = 30.0  # seconds to receive a whole request body
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds from connection (or the last response) to complete request headers
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0  # idle seconds before a keep-alive connection is closed
DEFAULT_SHUTDOWN_TIMEOUT = 10.0  # seconds the running request may take to finish after SIGTERM
API_KEY_ENV = "HYBRIMOE_API_KEYS"  # comma-separated keys, read by `hybrimoe serve` besides --api-key
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host_port(value: str) -> str:
    """The host name of a Host header value ('127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1')."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class ServerOptions:
    bind_host: str = "127.0.0.1"  # --host: decides the default Host check
    max_body_bytes: int | None = None  # None = BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * context
    max_queue: int = DEFAULT_MAX_QUEUE  # beyond it: 429 with Retry-After
    max_batch: int = DEFAULT_MAX_BATCH  # sequences the engine decodes together (--max-batch)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per batch step (--prefill-chunk)
    api_keys: tuple[str, ...] = ()  # empty = no authentication
    allowed_hosts: tuple[str, ...] | None = None  # Host header names; None = loopback names if bound there, else any
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed (and answered with CORS headers); "*" = any
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    threads: int | None = None  # torch threads of the engine thread; None = torch's default

    def __post_init__(self) -> None:
        if self.max_body_bytes is not None and (not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1):
            raise ConfigError(f"max_body_bytes (--max-body-bytes) must be >= 1, got {self.max_body_bytes!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ConfigError(f"max_queue (--max-queue) must be an integer >= 0, got {self.max_queue!r}")
        if not isinstance(self.max_batch, int) or isinstance(self.max_batch, bool) or self.max_batch < 1:
            raise ConfigError(f"max_batch (--max-batch) must be an integer >= 1, got {self.max_batch!r}")
        if not isinstance(self.prefill_chunk, int) or isinstance(self.prefill_chunk, bool) or self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk (--prefill-chunk) must be an integer >= 1, got {self.prefill_chunk!r}")
        for name in ("body_timeout", "header_timeout", "keep_alive_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} ({flag}) must be a number of seconds > 0, got {value!r}")
        if any(not key or any(c.isspace() for c in key) for key in self.api_keys):
            raise ConfigError("API keys must be non-empty and contain no whitespace")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads (--threads) must be an integer >= 1, got {self.threads!r}")
        for origin in self.allowed_origins:
            if origin != "*" and not _is_origin(origin):
                raise ConfigError(f"--allowed-origins: {origin!r} is not an origin such as http://localhost:3000")

    def body_limit(self, context_tokens: int) -> int:
        """Largest request body accepted, bytes."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * int(context_tokens)

    @property
    def hosts(self) -> tuple[str, ...] | None:
        """Host header names accepted (lower case); None = any."""
        if self.allowed_hosts is not None:
            return None if "*" in self.allowed_hosts else tuple(h.lower() for h in self.allowed_hosts)
        return LOOPBACK_NAMES if is_loopback(self.bind_host) else None

    def host_allowed(self, host_header: str | None) -> bool:
        hosts = self.hosts
        if hosts is None:
            return True
        return host_header is not None and split_host_port(host_header) in hosts

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        """A browser's Origin: same origin as the Host it asked for, or one of --allowed-origins."""
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        return bool(host_header) and parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.lower()


def _is_origin(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.path in ("", "/") \
        and not parts.query and not parts.fragment
