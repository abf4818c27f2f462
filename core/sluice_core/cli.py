"""The ``sluice`` command.

``check`` and ``apply`` live here (they only need the policy core), and ``usage`` / ``bucket``
(:mod:`sluice_core.usagecli`: an HTTP client of the analytics API, and Redis). The sidecar, the demo, the
operator, ``keys`` and ``services`` register themselves as entry points of the
``sluice.commands`` group (pyproject.toml); each names a module with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. They are read from the installed package
metadata and imported only when asked for, so the core never imports them and each starts
without loading the others.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol, cast

from sluice_core import configdoc, configstore, keysapply, usagecli
from sluice_core.errors import PolicyErrors
from sluice_core.lint import policy_warnings
from sluice_core.model import CLUSTER_SCOPE, CompiledPolicy
from sluice_core.policyfile import load_documents, load_policies

COMMANDS_GROUP = "sluice.commands"


class Command(Protocol):
    """What an entry point of :data:`COMMANDS_GROUP` loads (a module)."""

    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def installed_commands() -> dict[str, EntryPoint]:
    """The registered subcommands, by name, from the installed metadata (nothing imported)."""
    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


def load_command(entry_point: EntryPoint) -> Command:
    return cast(Command, entry_point.load())


def _cmd_check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            docs = load_documents(path, default_namespace=args.namespace)
        except PolicyErrors as exc:
            failed = True
            for e in exc.errors:
                print(f"error: {e}", file=sys.stderr)
            continue
        for d in docs:
            p = d.policy
            print(f"ok: {path}: {p.ref} ({len(p.tiers)} tiers, {len(p.rules)} rules, mode {p.mode.value})")
            for warning in policy_warnings(p, d.spec):  # what the validating webhook warns about
                print(f"warning: {d.source}: {warning}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_apply(args: argparse.Namespace) -> int:
    try:
        policies = load_policies(args.file, default_namespace=args.namespace)
    except PolicyErrors as exc:
        return _errors(exc)
    if args.api_keys_file and len(policies) != 1:
        print("error: --api-keys-file needs exactly one policy in -f", file=sys.stderr)
        return 1
    by_ns: dict[str, list[CompiledPolicy]] = {}
    for p in policies:
        by_ns.setdefault(p.namespace, []).append(p)
    scope = [n for n in (args.cluster_namespaces or "").split(",") if n]
    if CLUSTER_SCOPE in by_ns and not scope:
        print("error: a ClusterRateLimitPolicy needs --cluster-namespaces NS[,NS...]: the namespaces "
              "its namespaceSelector selects (the operator resolves it from namespace labels)",
              file=sys.stderr)
        return 1

    async def apply_all() -> None:
        async with configstore.connect(args.redis) as client:
            if args.api_keys_file:  # the grants before the document: see keysapply
                await _apply_keys(client, policies[0], args.api_keys_file)
            for ns, items in sorted(by_ns.items()):
                scopes = {p.name: scope for p in items} if ns == CLUSTER_SCOPE else None
                version = await configstore.publish(client, ns, configdoc.build_doc(ns, items, None, scopes))
                names = ", ".join(p.name for p in items)
                print(f"applied: namespace {ns}: {names} (config version {version})")
            # As the operator does: the cluster document always exists, so that a sidecar whose
            # namespace has no document knows no policy selects it (rather than waiting for a
            # config Redis might have lost).
            await configstore.ensure(client, CLUSTER_SCOPE)

    try:
        asyncio.run(apply_all())
    except PolicyErrors as exc:
        return _errors(exc)
    except (configstore.ConfigStoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _apply_keys(client: configstore.Client, policy: CompiledPolicy, path: str) -> None:
    """The keys file becomes the policy's grants in Redis (the document carries no keys)."""
    staged = await keysapply.stage(client, policy, path)
    try:
        changed = await staged.write(client)
        revoked = await staged.revoke_unlisted(client)
    finally:
        await staged.discard(client)
    print(f"keys: policy {policy.ref}: {staged.listed} granted ({changed.count} new or changed), {revoked} revoked"
          + (f", {staged.expired} expired entries skipped" if staged.expired else ""))


def _errors(exc: PolicyErrors) -> int:
    for e in exc.errors:
        print(f"error: {e}", file=sys.stderr)
    return 1


def build_parser(commands: Mapping[str, EntryPoint], *, with_help: bool = True) -> argparse.ArgumentParser:
    """The parser of ``check`` and ``apply``, listing ``commands`` too; ``with_help`` imports
    them for their one-line help (only worth it when the help is printed)."""
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice: distributed API rate limiting for Kubernetes")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check = sub.add_parser("check", help="validate policy files offline (exit 1 on any error)")
    check.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files or directories")
    check.add_argument("--namespace", default="default", help="namespace for policies that name none")
    check.set_defaults(func=_cmd_check)
    apply = sub.add_parser("apply", help="compile policies and write them to Redis, exactly as the operator does")
    apply.add_argument("-f", "--file", required=True, help="policy YAML file or directory")
    apply.add_argument("--redis", required=True, help="Redis URL (see README: redis://, rediss://, redis+sentinel://, redis+cluster://)")
    apply.add_argument("--api-keys-file", help="YAML of API key -> tier for the policy: becomes its key grants in Redis "
                       "(streamed, any size; keys it no longer lists are revoked; without it the grants stay)")
    apply.add_argument("--namespace", default="default", help="namespace for policies that name none")
    apply.add_argument("--cluster-namespaces", metavar="NS[,NS...]",
                       help="the namespaces the ClusterRateLimitPolicies in -f apply to (what the "
                            "operator resolves their namespaceSelector to)")
    apply.set_defaults(func=_cmd_apply)
    usagecli.add_parsers(sub)
    for name, entry_point in commands.items():
        sub.add_parser(name, help=load_command(entry_point).HELP if with_help else None, add_help=False)
    if not commands:
        parser.epilog = (f"No other command is registered under the {COMMANDS_GROUP} entry points: "
                         "the package metadata is missing or stale (make setup, or pip install -e .)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = installed_commands()
    if argv and argv[0] in commands:
        command = load_command(commands[argv[0]])
        sub = argparse.ArgumentParser(prog=f"sluice {argv[0]}", description=command.HELP)
        command.add_arguments(sub)
        return int(command.run(sub.parse_args(argv[1:])))
    wants_help = "-h" in argv or "--help" in argv
    args = build_parser(commands, with_help=wants_help).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
