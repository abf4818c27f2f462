"""Redis connection URLs understood by every Sluice component.

- ``redis://[user:password@]host:port[/db]`` and ``rediss://`` (TLS)
- ``redis+sentinel://[user:password@]host1:26379,host2:26379/<master name>[/db]``
  (``rediss+sentinel://`` for TLS to the master)
- ``redis+cluster://[user:password@]host1:7000,host2:7001`` (``rediss+cluster://``)

Query parameters: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs=required|none``, ``sentinel_password``. The password never appears in
``str()``/``repr()`` of the parsed target, so it cannot reach a log line through it, and an
error never echoes any part of the host list or the path: a password holding an unencoded
``/``, ``?``, ``#`` or ``@`` is split there by the URL grammar, so either part may hold a
piece of it. Errors name the position and the rule instead.
"""

from __future__ import annotations

import dataclasses
import ssl
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import parse_qs, unquote, urlsplit


class Topology(StrEnum):
    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class RedisTarget:
    topology: Topology
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_verify: bool = True
    master_name: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        scheme = ("rediss" if self.tls else "redis") + ("" if self.topology is Topology.SINGLE else f"+{self.topology.value}")
        auth = "***@" if self.password else ""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        tail = f"/{self.master_name}" if self.master_name else ""
        return f"{scheme}://{auth}{hosts}{tail}/{self.db}" if self.db else f"{scheme}://{auth}{hosts}{tail}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_ca_certs)
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        if not self.ssl_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def with_ca(target: RedisTarget, ca_file: str | None) -> RedisTarget:
    """``target`` verified with ``ca_file`` when it is TLS and its URL named no CA of its own."""
    if ca_file and target.tls and not target.ssl_ca_certs:
        return dataclasses.replace(target, ssl_ca_certs=ca_file)
    return target


ENCODE_HINT = "a password containing / ? # @ must be percent-encoded (%2F %3F %23 %40)"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a URL; raise ``ValueError`` naming what is wrong (never echoing a password)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host list; its message quotes the URL
        raise ValueError(f"redis URL: the host list cannot be parsed; {ENCODE_HINT}") from None
    scheme = parts.scheme.lower()
    base, _, topo = scheme.partition("+")
    if base not in ("redis", "rediss") or topo not in ("", "sentinel", "cluster"):
        # Only a well-formed scheme is quoted: an unusual "scheme" may be a password's head.
        shown = repr(scheme) if scheme.replace("+", "").isalpha() and len(scheme) <= 20 else "another"
        raise ValueError(f"redis URL scheme must be redis, rediss, redis+sentinel or redis+cluster, got {shown}")
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        # The user-info ended early: at a "/", "?" or "#" of the password.
        raise ValueError(f"redis URL: an '@' follows the host list; {ENCODE_HINT}")
    topology = Topology(topo or "single")
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user, sep, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
        if not sep:  # redis://secret@host is the common "password only" spelling
            username, password = None, unquote(user)
    hosts: list[tuple[str, int]] = []
    default_port = 26379 if topology is Topology.SENTINEL else 6379
    for n, item in enumerate(netloc.split(","), 1):
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_s = rest.lstrip(":")
        else:
            host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_s) if port_s else default_port
            if not (port_s.isdigit() or not port_s) or not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise ValueError(f"redis URL: the port of host #{n} is not a number from 1 to 65535; {ENCODE_HINT}") from None
        hosts.append((host or "127.0.0.1", port))
    if not hosts:
        raise ValueError("redis URL: no host given")
    if topology is Topology.SINGLE and len(hosts) > 1:
        raise ValueError("redis URL: several hosts need redis+sentinel:// or redis+cluster://")
    path = [p for p in parts.path.split("/") if p]
    master = None
    if topology is Topology.SENTINEL:
        if not path:
            raise ValueError("redis+sentinel URL: the master name is missing (…/mymaster)")
        master, path = path[0], path[1:]
    db = 0
    if path:
        try:
            db = int(path[0])
        except ValueError:
            raise ValueError(f"redis URL: the database (the path after the hosts) is not a number; "
                             f"{ENCODE_HINT}") from None
    if db and topology is Topology.CLUSTER:
        raise ValueError("redis+cluster URL: Redis Cluster has only database 0")
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(q) - {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "sentinel_password"}
    if unknown:
        raise ValueError(f"redis URL: unknown parameter(s) {', '.join(sorted(unknown))}")
    reqs = q.get("ssl_cert_reqs", "required")
    if reqs not in ("required", "none"):
        raise ValueError(f"redis URL: ssl_cert_reqs must be required or none, got {reqs!r}")
    return RedisTarget(
        topology=topology, hosts=tuple(hosts), db=db, username=username, password=password,
        tls=base == "rediss", ssl_ca_certs=q.get("ssl_ca_certs"), ssl_certfile=q.get("ssl_certfile"),
        ssl_keyfile=q.get("ssl_keyfile"), ssl_verify=reqs == "required", master_name=master,
        sentinel_password=q.get("sentinel_password"),
    )
