"""The Lua scripts, shipped as package data and loaded by name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha1: str


@cache
def load(name: str) -> Script:
    text = resources.files("sluice_core").joinpath("scripts", f"{name}.lua").read_text("utf-8")
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())


def decide() -> Script:
    return load("decide")


def publish_config() -> Script:
    return load("publish_config")


def drop_empty_config() -> Script:
    return load("drop_empty_config")


def write_grant() -> Script:
    return load("write_grant")


def announce_keys() -> Script:
    return load("announce_keys")


def apply_lease() -> Script:
    return load("apply_lease")


def unlisted_keys() -> Script:
    return load("unlisted_keys")


def note_grant() -> Script:
    return load("note_grant")


def trim_usage() -> Script:
    return load("trim_usage")


def forget_consumers() -> Script:
    return load("forget_consumers")


def write_usage_summary() -> Script:
    return load("write_usage_summary")
