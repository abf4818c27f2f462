"""The admission webhooks' HTTPS server (aiohttp).

Routes: ``POST /validate-policy`` (:func:`policy_admission.review_policy`), ``POST /mutate-pod``
(:func:`pod_admission.mutate_pod`), ``GET /healthz``. Every answer to a well-formed
AdmissionReview is an AdmissionReview v1; a body that is not JSON or not an AdmissionReview
gets 400, a body larger than ``max_body_bytes`` 413 (the API server sends at most a few MB).

    server = WebhookServer(cert_file, key_file, injection=InjectionSettings(), port=8443)
    await server.start()          # or: async with server: ...
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from sluice_operator.admission_review import ReviewError, error_review
from sluice_operator.injection.grace import too_short
from sluice_operator.injection.ownerevents import OwnerEvents
from sluice_operator.injection.redisca import RedisCaCopies
from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.pod_admission import PolicyLookup, mutate_pod, namespace_to_look_up
from sluice_operator.policy_admission import review_policy
from sluice_operator.taskstop import stop_tasks

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
NamespaceLookup = Callable[[str], Awaitable[Mapping[str, str] | None]]
"""Namespace name -> its labels (the operator reads them with the kubernetes client)."""


class WebhookServer:
    def __init__(
        self,
        cert_file: str | Path | None,
        key_file: str | Path | None,
        *,
        injection: InjectionSettings | None = None,
        namespace_labels: NamespaceLookup | None = None,
        policies: PolicyLookup | None = None,
        redis_ca: RedisCaCopies | None = None,
        events: OwnerEvents | None = None,
        host: str = "0.0.0.0",
        port: int = 8443,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        """``cert_file``/``key_file`` None serves plain HTTP (tests and local debugging only:
        the API server only calls webhooks over HTTPS)."""
        self.cert_file = cert_file
        self.key_file = key_file
        self.injection = injection or InjectionSettings()
        self.namespace_labels = namespace_labels
        self.policies = policies
        self.redis_ca = redis_ca
        self.events = events
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self._runner: web.AppRunner | None = None
        self._ssl: ssl.SSLContext | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/validate-policy", self._validate)
        app.router.add_post("/mutate-pod", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        return app

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.cert_file is None or self.key_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    def reload_certificates(self) -> None:
        """Pick up renewed files (cert-manager rotates them in place); new connections use them.
        The pair is loaded into a scratch context first: files caught half-written raise here
        and leave the serving context as it was."""
        if self._ssl is not None and self.cert_file is not None and self.key_file is not None:
            self.ssl_context()
            self._ssl.load_cert_chain(str(self.cert_file), str(self.key_file))

    async def start(self) -> None:
        self._ssl = self.ssl_context()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl)
        await site.start()
        if self._runner.addresses:  # the bound port when port=0
            self.port = self._runner.addresses[0][1]
        log.info("admission webhooks listening on %s:%s (%s)", self.host, self.port,
                 "https" if self._ssl else "http")

    def run_while_serving(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task that ends when the server stops (certificate refresh)."""
        self._tasks.append(asyncio.create_task(coro))

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebhookServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        scheme = "https" if self.cert_file is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # -- handlers --------------------------------------------------------------------------

    async def _read_review(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes,
                                                actual_size=request.content_length)
        body = await request.read()  # aiohttp enforces client_max_size while reading (413)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from None

    async def _validate(self, request: web.Request) -> web.Response:
        review = await self._read_review(request)
        try:
            answer = review_policy(review)
        except ReviewError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response(answer)

    async def _mutate(self, request: web.Request) -> web.Response:
        review = await self._read_review(request)
        labels: Mapping[str, str] | None = None
        lookup_error: Exception | None = None
        namespace = namespace_to_look_up(review)
        if self.namespace_labels is not None and namespace:
            try:
                labels = await self.namespace_labels(namespace)
            except Exception as exc:
                lookup_error = exc
                log.warning("cannot read labels of namespace %s: %s", namespace, exc)

        def lookup(_: str) -> Mapping[str, str] | None:
            if lookup_error is not None:
                raise lookup_error
            return labels

        try:
            answer = mutate_pod(review, self.injection,
                                lookup if self.namespace_labels is not None else None, self.policies)
        except ReviewError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        except Exception as exc:  # the mutating webhook never blocks a pod
            log.exception("sidecar injection failed")
            uid = review["request"]["uid"]
            return web.json_response(error_review(uid, f"sluice: sidecar not injected: {exc!r}"))
        await self._side_effects(review, answer)
        return web.json_response(answer)

    async def _side_effects(self, review: Any, answer: dict[str, Any]) -> None:
        """For an injected pod: the Redis CA's ConfigMap it mounts, made sure of in its namespace,
        and an Event on its owner when its grace period is too short for the drain. Never on a
        dry run (nothing is created then, and the webhook declares NoneOnDryRun)."""
        response, request = answer["response"], review["request"]
        if "patch" not in response or request.get("dryRun"):
            return
        pod = request.get("object") or {}
        namespace = str(request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default")
        if self.redis_ca is not None and (warning := await self.redis_ca.ensure_within(namespace)):
            response.setdefault("warnings", []).append(warning)
        if self.events is not None and (short := too_short(pod.get("spec") or {}, self.injection)):
            await self.events.warn(pod, namespace, "GracePeriodTooShort", short)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")
