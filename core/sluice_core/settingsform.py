"""Settings as documented dataclasses: one form for the flags of every Sluice process.

A process's settings are a frozen dataclass declared with :func:`settings_form`; each field
made with :func:`setting` carries its default, its help (also the meaning column of the
README's reference tables) and what a value may be: one of some choices, greater than 0 and
finite, or whatever a parser of its own accepts. From that one class come

- the argparse flags (:func:`add_arguments`): ``--<prefix><name>``, each also read from the
  environment variable ``<ENV_PREFIX><NAME>`` or ``<ENV_PREFIX><Doc.env>`` (the command line
  wins; an empty value means the default, except for a required flag, where it is checked as
  given; a repeatable flag's variable holds one value per line);
- the check of every value, whether it came from a flag or a variable (:func:`load`): the first
  bad one is a :class:`SettingError`, one line naming the flag;
- the rows of the README's reference tables (:func:`reference_rows`).

Fields without :func:`setting` are not flags (wiring that tests and the command line fill in).
"""

from __future__ import annotations

import argparse
import math
import os
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar, dataclass_transform

LOG_LEVELS = ("debug", "info", "warning", "error")
"""The ``--log-level`` of every process (Python's logging levels, as the chart spells them)."""

_DOC = "sluice.setting"
_FORM = "__sluice_settings_form__"
T = TypeVar("T")


@dataclass(frozen=True)
class Doc:
    """What a setting is, beyond its name, type and default (a field's metadata)."""

    help: str
    """One sentence or a few; `backticks` mark literals (the README keeps them, --help drops them)."""
    choices: tuple[str, ...] = ()
    positive: bool = False
    """Greater than 0 and finite (a timeout or a limit of 0 would refuse everything or spin)."""
    parse: Callable[[Any], Any] | None = None
    """Text (a repeatable flag: the list of texts) -> value; raises ValueError with the reason."""
    flag: str | None = None
    """The flag's name after the prefix, when it is not the field's name with dashes."""
    env: str | None = None
    """The environment variable's name after the form's prefix, when it is not the flag's
    (``WATCH_NAMESPACES``: ``<APP>_NAMESPACE`` is the usual name for one's own namespace)."""
    kind: type | None = None
    """int, float or str, when the field's type does not say (a part of a mapping)."""
    metavar: str | None = None
    shown: str | None = None
    """The default as the help and the README put it, when the value alone would not say it."""
    repeatable: bool = False
    fold_case: bool = False
    parts: tuple[tuple[str, Doc], ...] = ()
    """A mapping setting made of one flag per part (key, its Doc); a part left unset is left out."""
    chart: str | None = None
    """The Helm chart value that sets it, when the chart has one."""


def setting(*, default: Any = MISSING, help: str, default_factory: Any = MISSING,
            choices: tuple[str, ...] = (), positive: bool = False,
            parse: Callable[[Any], Any] | None = None, flag: str | None = None,
            env: str | None = None, kind: type | None = None, metavar: str | None = None, shown: str | None = None,
            repeatable: bool = False, fold_case: bool = False,
            parts: tuple[tuple[str, Doc], ...] = (), chart: str | None = None) -> Any:
    """A field of a :func:`settings_form` class that is a flag."""
    doc = Doc(help=help, choices=choices, positive=positive, parse=parse, flag=flag, env=env, kind=kind,
              metavar=metavar, shown=shown, repeatable=repeatable, fold_case=fold_case,
              parts=parts, chart=chart)
    return documented(doc, default=default, default_factory=default_factory)


def documented(doc: Doc, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A flag field from a :class:`Doc` made elsewhere (one setting offered by two forms).
    Type checkers see a default only when ``default=``/``default_factory=`` is a keyword."""
    return field(default=default, default_factory=default_factory, metadata={_DOC: doc})


@dataclass(frozen=True)
class Form:
    flag_prefix: str
    """``--<flag_prefix><name>``: ``""`` for the sidecar, ``"sidecar-"`` for the injector."""
    env_prefix: str


@dataclass_transform(field_specifiers=(setting, documented, field), frozen_default=True)
def settings_form(*, flag_prefix: str = "", env_prefix: str) -> Callable[[type[T]], type[T]]:
    """Declare a frozen settings dataclass whose :func:`setting` fields are flags."""

    def wrap(cls: type[T]) -> type[T]:
        made = dataclass(frozen=True)(cls)
        setattr(made, _FORM, Form(flag_prefix, env_prefix))
        return made

    return wrap


@dataclass(frozen=True)
class Flag:
    """One flag of a form: where its value goes (``field``, and ``key`` for a mapping's part)."""

    name: str
    """``--sidecar-max-connections``"""
    env: str
    dest: str
    field: str
    key: str | None
    doc: Doc
    kind: type
    default: Any
    required: bool

    def shown_default(self) -> str | None:
        """The default as words (None: there is none to show)."""
        if self.doc.shown is not None:
            return self.doc.shown
        if self.required or self.default is None:
            return None
        if isinstance(self.default, (tuple, list, dict)):  # a repeatable flag's, a mapping's
            return ", ".join(map(str, self.default)) or None
        return str(self.default)


def form_of(cls: type) -> Form:
    form = getattr(cls, _FORM, None)
    if not isinstance(form, Form):
        raise TypeError(f"{cls.__name__} is not declared with settings_form")
    return form


def doc_of(f: Field[Any]) -> Doc | None:
    doc = f.metadata.get(_DOC)
    return doc if isinstance(doc, Doc) else None


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of a settings class (one place for every default)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise KeyError(name)


def split_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` to listen on -> ``(host, port)``: an empty HOST (or ``[]``) is every
    address, ``0.0.0.0``; PORT 0 is any free port. ValueError otherwise."""
    host, sep, number = text.rpartition(":")
    if not sep or not number.isdigit() or int(number) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(number)


def env_name(cls: type, name: str) -> str:
    """The environment variable of field ``name`` (``redis_timeout_ms`` -> ``SLUICE_REDIS_TIMEOUT_MS``)."""
    return next(f.env for f in flags(cls) if f.field == name and f.key is None)


def flag_name(cls: type, name: str) -> str:
    """The flag of field ``name`` (``sidecar_port`` -> ``--sidecar-port``)."""
    return next(f.name for f in flags(cls) if f.field == name and f.key is None)


def flags(cls: type) -> Iterator[Flag]:
    """The flags of a settings class, in field order (a mapping's parts in their order)."""
    form = form_of(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        doc = doc_of(f)
        if doc is None:
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else default_of(cls, f.name)
        if doc.parts:
            for key, part in doc.parts:
                yield _flag(form, part.flag or key, f.name, key, part, part.kind or str, None, False)
        else:
            kind = doc.kind or _kind(hints[f.name])
            yield _flag(form, doc.flag or f.name, f.name, None, doc, kind, default, required)


def _flag(form: Form, name: str, field_name: str, key: str | None, doc: Doc, kind: type,
          default: Any, required: bool) -> Flag:
    suffix = form.flag_prefix + name.replace("_", "-")
    env = doc.env or suffix.replace("-", "_").upper()
    return Flag(name="--" + suffix, env=form.env_prefix + env,
                dest=suffix.replace("-", "_"), field=field_name, key=key, doc=doc, kind=kind,
                default=default, required=required)


def _kind(hint: Any) -> type:
    """int, float or str from ``int``, ``float | None`` ...; anything else needs a parser."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0] if len(options) == 1 and options[0] in (int, float) else str


def _plain(text: str) -> str:
    return text.replace("`", "")


class _Repeat(argparse.Action):
    """A repeatable flag whose values replace the environment variable's list (an ``append``
    action would add to it)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest)
        items = [] if current is None or current is self.default else list(current)
        items.append(values)
        setattr(namespace, self.dest, items)


def _lenient(kind: type) -> Callable[[str], Any]:
    """argparse's ``type``: the value when the text is one, else the text (then :func:`load`
    refuses it with the flag's name, as it refuses the same text from the environment)."""

    def convert(text: str) -> Any:
        try:
            return kind(text) if text.strip() else text
        except ValueError:
            return text

    convert.__name__ = kind.__name__
    return convert


def add_arguments(parser: argparse._ActionsContainer, cls: type) -> None:
    """The flags of ``cls``, each defaulting to its environment variable's text (read now)."""
    for flag in flags(cls):
        text = os.environ.get(flag.env)
        help_text = f"{_plain(flag.doc.help)} [env {flag.env}"
        help_text += ", one per line]" if flag.doc.repeatable else "]"
        shown = flag.shown_default()
        if not flag.required:
            help_text += f" (default: {_plain(shown) if shown else 'none'})"
        metavar = flag.doc.metavar or ("{" + ",".join(flag.doc.choices) + "}" if flag.doc.choices else None)
        if flag.doc.repeatable:
            parser.add_argument(flag.name, dest=flag.dest, action=_Repeat, metavar=metavar, help=help_text,
                                default=None if text is None else text.splitlines())
        else:
            parser.add_argument(flag.name, dest=flag.dest, type=_lenient(flag.kind), metavar=metavar,
                                help=help_text, default=text,
                                required=flag.required and text is None)


@dataclass(frozen=True)
class Voice:
    """How a refused value is put into words. The sidecar and the operator said it differently
    before the form existed (``--x must be a or b`` / ``--x: expected one of a, b``); both
    voices are kept, so a refusal the old code gave keeps its wording. The form did change what
    the operator refuses (README.md lists it under the operator's flags): ``--resync-interval-s``
    <= 0 is refused, ``--peering-lifetime-s 0`` says ``must be greater than 0`` (was ``must be at
    least 1``), ``--log-level`` takes its five names only (``WARN``, ``FATAL`` no more), and
    every flag is read from an environment variable too."""

    between: str
    """Between the flag and the reason."""
    expected: str
    """Before what was expected."""
    alternatives: Callable[[Sequence[str]], str]


MUST_BE = Voice(" ", "must be", " or ".join)
"""``--log-level must be debug or info or warning or error, got 'loud'`` (the sidecar)."""
EXPECTED = Voice(": ", "expected", lambda allowed: "one of " + ", ".join(allowed))
"""``--sidecar-log-level: expected one of debug, info, warning, error, got 'trace'`` (the operator)."""


class SettingError(ValueError):
    """A refused value: ``str()`` is the one line naming the flag and the reason."""

    def __init__(self, flag: str, reason: str, voice: Voice) -> None:
        super().__init__(f"{flag}{voice.between}{reason}")
        self.flag = flag


def load(cls: type[T], args: argparse.Namespace, voice: Voice, **defaults: Any) -> T:
    """``cls`` from the parsed flags: every value checked (the first bad one raises
    :class:`SettingError`); a flag left unset (or empty) keeps ``defaults[field]``, else the
    field's default. A required flag has none: its empty value is checked like any other (its
    parser, or the process, refuses it with the reason it gives a bad one)."""
    values: dict[str, Any] = dict(defaults)
    for flag in flags(cls):
        raw = getattr(args, flag.dest, None)
        if flag.required and flag.field not in values:
            if raw is None:  # argparse requires it: only a Namespace made by hand gets here
                raise SettingError(flag.name, f"is required (or {flag.env})", voice)
        elif raw is None or (isinstance(raw, str) and not raw.strip()):
            if flag.key is not None:
                values.setdefault(flag.field, {})
            continue
        value = check(flag, raw, voice)
        if flag.key is None:
            values[flag.field] = value
        else:
            values.setdefault(flag.field, {})[flag.key] = value
    return cls(**values)


def check(flag: Flag, raw: Any, voice: Voice) -> Any:
    """One flag's value from its text (or the value argparse already made of it)."""
    doc = flag.doc

    def refuse(reason: str) -> SettingError:
        return SettingError(flag.name, reason, voice)

    value = raw.strip() if isinstance(raw, str) else raw
    if isinstance(value, str) and flag.kind in (int, float):
        try:
            value = flag.kind(value)
        except ValueError:
            noun = "integer" if flag.kind is int else "number"
            what = f"a positive {noun}" if doc.positive else f"{'an' if flag.kind is int else 'a'} {noun}"
            raise refuse(f"{voice.expected} {what}, got {raw!r}") from None
    if doc.fold_case and isinstance(value, str):
        value = value.lower()
    if doc.choices and value not in doc.choices:
        raise refuse(f"{voice.expected} {voice.alternatives(doc.choices)}, got {raw!r}")
    if doc.positive:
        assert isinstance(value, (int, float)), flag.name  # a positive setting is a number
        if not value > 0:  # nan fails every comparison
            raise refuse(f"must be greater than 0, got {value}")
        if not math.isfinite(value):  # inf would mean "never": a breaker that never probes
            raise refuse(f"must be greater than 0 and finite, got {value}")
    if doc.parse is not None:
        try:
            value = doc.parse(value)
        except ValueError as exc:
            raise refuse(str(exc)) from None
    return value


def reference_rows(cls: type, columns: Sequence[str]) -> list[str]:
    """The README table rows of ``cls``: ``flag``, ``env``, ``chart``, ``default``, ``meaning``."""
    rows = []
    for flag in flags(cls):
        shown = flag.shown_default()
        cells = {
            "flag": f"`{flag.name}`",
            "env": f"`{flag.env}`" + (" (one per line)" if flag.doc.repeatable else ""),
            "chart": f"`{flag.doc.chart}`" if flag.doc.chart else "–",
            "default": "required" if flag.required else "–" if shown is None
            else shown if flag.doc.shown is not None else f"`{shown}`",
            "meaning": flag.doc.help,
        }
        rows.append("| " + " | ".join(cells[c] for c in columns) + " |")
    return rows

