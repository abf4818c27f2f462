"""Reading a keys file of any size one entry at a time (``sluice apply --api-keys-file``).

The file is the one the sidecar's standalone mode reads (:mod:`sluice_core.apikeys`), plus two
fields per entry::

    keys:
      "sk_pro_4Jx...": pro
      "sha256:9f86d08...": {tier: enterprise, id: acme-prod, expiresAt: "2027-01-31T00:00:00Z"}

- ``id``: how usage reports name the key (1-256 printable ASCII characters, no spaces); by
  default ``sha256:`` and the first 16 hex digits of the key's SHA-256 (not secret: the
  digest is what Redis stores; 64 bits, so a million keys get distinct ids but for a chance of
  about 3 in 10^8). Ids are not checked for uniqueness: that would take memory per key.
- ``expiresAt``: an RFC 3339 time with its offset (``Z`` or ``+02:00``); the key stops working
  then (Redis drops its grant). An entry already expired grants nothing.

libyaml (PyYAML's C parser) reads the file in chunks and hands over events; each entry is
composed and checked alone, so memory holds one entry, never the document. Every entry is
checked as :func:`sluice_core.apikeys.check_entry` checks it; errors name the entry's index and
line, never its key, and the first :data:`MAX_ERRORS` are kept (with a count of the rest).
Duplicate keys are not found here (that needs memory per key): the caller stages the keys in
Redis (:mod:`sluice_core.keysapply`). Anchors and aliases are refused (a few bytes of aliases
can stand for gigabytes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from sluice_core import grants
from sluice_core.apikeys import check_entry
from sluice_core.errors import PolicyError
from sluice_core.grants import default_key_id
from sluice_core.model import CompiledPolicy
from sluice_core.parse import DocumentChecker
from sluice_core.yamltext import describe

MAX_ERRORS = 100
MAX_ENTRY_EVENTS = 64
"""YAML events one entry may take: ``{tier, id, expiresAt, limit: {requests, period, burst}}``
is 20; more is not a keys-file entry, and composing it would take memory the file chooses."""
_FIELDS = frozenset({"id", "expiresAt"})
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)")
_STR, _TIMESTAMP = "tag:yaml.org,2002:str", "tag:yaml.org,2002:timestamp"
_SCALARS: dict[str, Callable[[yaml.SafeLoader, yaml.ScalarNode], Any]] = {
    f"tag:yaml.org,2002:{name}": yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{name}"]
    for name in ("int", "float", "bool", "null")
}
_CONSTRUCTOR = yaml.SafeLoader("")  # its scalar constructors read only the node they are given


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One valid entry: its index in the file, its key's SHA-256 (raw), what Redis stores."""

    index: int
    sha256: bytes
    stored: grants.StoredGrant


class _Skip(Exception):
    """This entry cannot be read as an entry (alias, too large, unknown tag); the reason is
    the message, and the entry's events are consumed."""


class _Events:
    """The parser's events, typed: the file ended early is a YAML error like any other."""

    def __init__(self, loader: yaml.CSafeLoader) -> None:
        self.loader = loader

    def next(self) -> Event:
        e: Event | None = self.loader.get_event()
        if e is None:
            raise yaml.YAMLError("the file ends inside a node")
        return e

    def at(self, kind: type[Event]) -> bool:
        return bool(self.loader.check_event(kind))

    def resolve(self, event: ScalarEvent) -> str:
        return str(self.loader.resolve(yaml.ScalarNode, event.value, event.implicit))  # type: ignore[no-untyped-call]


def _line(event: Event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 0


class KeysFile:
    """Iterate it for its valid entries; afterwards :attr:`errors` holds what was wrong (the
    first :data:`MAX_ERRORS`) and :attr:`error_count` how many there were."""

    def __init__(self, path: str | Path, policy: CompiledPolicy) -> None:
        self.path = str(path)
        self.policy = policy
        self.errors: list[PolicyError] = []
        self.error_count = 0

    def fail(self, path: str, reason: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(PolicyError(path, reason, self.path))

    def all_errors(self) -> list[PolicyError]:
        more = self.error_count - len(self.errors)
        return self.errors + ([PolicyError("(keys file)", f"{more} more errors not shown", self.path)]
                              if more > 0 else [])

    def __iter__(self) -> Iterator[KeyEntry]:
        try:
            with open(self.path, "rb") as f:
                loader = yaml.CSafeLoader(f)
                try:
                    yield from self._stream(_Events(loader))
                finally:
                    loader.dispose()
        except OSError as exc:
            self.fail("(keys file)", f"cannot be read: {exc.strerror}")
        except yaml.YAMLError as exc:  # described without quoting the file: it may hold keys
            self.fail("(keys file)", f"is not valid YAML: {describe(exc)}")

    def _stream(self, loader: _Events) -> Iterator[KeyEntry]:
        loader.next()  # StreamStart
        if loader.at(StreamEndEvent):
            self.fail("keys", "is required")
            return
        loader.next()  # DocumentStart
        top = loader.next()
        if not isinstance(top, MappingStartEvent):
            self._consume(loader, top)
            self.fail("(keys file)", "must be an object with a `keys` field")
        else:
            found = False
            while not loader.at(MappingEndEvent):
                name = loader.next()
                if not (isinstance(name, ScalarEvent) and name.value == "keys"):
                    self._consume(loader, name)  # another field: ignored, as apikeys does
                    self._consume(loader, loader.next())
                elif found:
                    self.fail("keys", f"is given twice (line {_line(name)})")
                    self._consume(loader, loader.next())
                else:
                    found = True
                    yield from self._keys(loader)
            loader.next()  # MappingEnd
            if not found:
                self.fail("keys", "is required")
        loader.next()  # DocumentEnd
        if loader.at(DocumentStartEvent):
            self.fail("(keys file)", "holds more than one YAML document")

    def _keys(self, loader: _Events) -> Iterator[KeyEntry]:
        start = loader.next()
        if not isinstance(start, MappingStartEvent):
            self._consume(loader, start)
            null = isinstance(start, ScalarEvent) and start.implicit[0] and start.value in ("", "~", "null")
            self.fail("keys", "is required" if null else "must be an object of key: tier or key: {tier: ...}")
            return
        index = 0
        while not loader.at(MappingEndEvent):
            key_event = loader.next()
            line = _line(key_event)
            try:
                raw_key = self._compose(loader, key_event, [MAX_ENTRY_EVENTS])
                value = self._compose(loader, loader.next(), [MAX_ENTRY_EVENTS])
            except _Skip as exc:
                self.fail(f"keys[{index}]", f"{exc} (line {line})")
            else:
                entry = self._entry(index, line, raw_key, value)
                if entry is not None:
                    yield entry
            index += 1
        loader.next()  # MappingEnd

    def _entry(self, index: int, line: int, raw_key: Any, value: Any) -> KeyEntry | None:
        p = f"keys[{index}]"  # never echo the key itself: the file may hold plaintext secrets
        c = DocumentChecker(self.path)
        checked = check_entry(c, p, raw_key, value, self.policy, fields=_FIELDS)
        stored = None
        if checked is not None:
            digest, grant, spec = checked
            key_id = spec.get("id", default_key_id(digest))
            expires_ms = _expiry(c, f"{p}.expiresAt", spec.get("expiresAt"))
            stored = grants.StoredGrant(grant, key_id if isinstance(key_id, str) else "", expires_ms)
            try:
                grants.encode(stored, self.policy.ref)
            except ValueError as exc:
                c.fail(f"{p}.id", str(exc))
        for e in c.errors:
            self.fail(e.path, f"{e.reason} (line {line})")
        if c.errors or stored is None or checked is None:
            return None
        return KeyEntry(index, bytes.fromhex(checked[0]), stored)

    def _compose(self, loader: _Events, event: Event, budget: list[int]) -> Any:
        """The value a node stands for, built from its events; raises :class:`_Skip` (after
        consuming the node) for what an entry cannot hold."""
        budget[0] -= 1
        if isinstance(event, AliasEvent):
            raise _Skip("anchors and aliases are not allowed in a keys file")
        if budget[0] < 0:
            self._consume(loader, event)
            raise _Skip("is too large for a keys-file entry")
        if isinstance(event, ScalarEvent):
            return _scalar(loader, event)
        if isinstance(event, SequenceStartEvent):
            items = []
            while not loader.at(yaml.SequenceEndEvent):
                items.append(self._next(loader, budget))
            loader.next()
            return items
        out: dict[Any, Any] = {}
        while not loader.at(MappingEndEvent):
            k = self._next(loader, budget)
            v = self._next(loader, budget)
            if isinstance(k, dict | list) or k in out:
                self._consume_to_end(loader)
                raise _Skip("a field name must be text" if isinstance(k, dict | list) else "a field is given twice")
            out[k] = v
        loader.next()
        return out

    def _next(self, loader: _Events, budget: list[int]) -> Any:
        """The next node of the collection being read; when it cannot be read, the rest of
        that collection is consumed too."""
        try:
            return self._compose(loader, loader.next(), budget)
        except _Skip:
            self._consume_to_end(loader)
            raise

    @staticmethod
    def _consume(loader: _Events, event: Event) -> None:
        """Skip the rest of the node that ``event`` starts."""
        if isinstance(event, CollectionStartEvent):
            KeysFile._consume_to_end(loader)

    @staticmethod
    def _consume_to_end(loader: _Events) -> None:
        """Skip to the end of the collection being read (its end event included)."""
        depth = 1
        while depth:
            e = loader.next()
            if isinstance(e, CollectionStartEvent):
                depth += 1
            elif isinstance(e, yaml.CollectionEndEvent):
                depth -= 1


def _scalar(loader: _Events, event: ScalarEvent) -> Any:
    tag = event.tag
    if tag is None or tag == "!":
        tag = loader.resolve(event)
    if tag in (_STR, _TIMESTAMP):  # a time stays text: expiresAt is parsed as RFC 3339 below
        return event.value
    construct = _SCALARS.get(tag)
    if construct is None:
        raise _Skip("holds a YAML tag a keys file does not use")
    return construct(_CONSTRUCTOR, yaml.ScalarNode(tag, event.value))


def _expiry(c: DocumentChecker, path: str, value: Any) -> int:
    """Unix ms of an ``expiresAt`` (0: none)."""
    if value is None:
        return 0
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        c.fail(path, "must be an RFC 3339 time with its offset, e.g. 2027-01-31T00:00:00Z")
        return 0
    at = datetime.fromisoformat(value.upper())
    return int(at.timestamp() * 1000)
