"""What happens around every Tally RPC, declared once per method with `@rpc(scope, tenant=...)`.

In order: the request id is read from `x-request-id` (or made up) and sent back (in the
initial metadata of streams, the trailing metadata of unary calls and of every error);
the bearer token is verified (UNAUTHENTICATED); the scope is checked (PERMISSION_DENIED);
a malformed request is refused (INVALID_ARGUMENT); the principal's request rate, and the
named tenant's if the principal may act for it, are charged (RESOURCE_EXHAUSTED with
RetryInfo); a stream takes one of the principal's stream slots and its incoming messages
are subject to the idle timeout (DEADLINE_EXCEEDED). The method then runs with a
`Caller`. Any failure becomes a precise status (server.api.errors). Around all of it, the
call is observed (server.telemetry.calls): a span when tracing is on, an access log line
and the call counts.

Tenant isolation itself is enforced by the use cases, which receive the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc

from server.api.decoding import Malformed
from server.api.errors import REQUEST_ID_KEY, abort
from server.auth.authenticator import Authenticator
from server.domain.access import Caller
from server.domain.errors import DeadlineExceeded, ErrorReason, InvalidArgument
from server.telemetry.calls import CallTelemetry

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=\-]{1,128}")

Method = Callable[..., Any]


class Guarded(Protocol):
    """A servicer whose calls are authenticated and limited, and observed.

    `authenticator` authenticates and limits each call; `telemetry` observes it.
    """

    authenticator: Authenticator
    telemetry: CallTelemetry


_SERVICES: dict[type, str] = {}


def service_name(servicer: object) -> str:
    """The gRPC service a servicer implements ("tally.v1.UsageService"), from its generated base."""
    cls = type(servicer)
    name = _SERVICES.get(cls)
    if name is None:
        base = next(
            (
                c
                for c in cls.__mro__
                if c.__module__.endswith("_pb2_grpc") and c.__name__.endswith("Servicer")
            ),
            cls,
        )
        package = base.__module__.rpartition(".")[0]
        name = _SERVICES[cls] = f"{package}.{base.__name__.removesuffix('Servicer')}"
    return name


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The client's x-request-id if it is a sane token, else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _malformed(request: object) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument.single("request", request.reason, reason=ErrorReason.REQUEST_MALFORMED)


async def _incoming(requests: AsyncIterator[Any], idle_seconds: float) -> AsyncIterator[Any]:
    """The client's messages; an idle client or a malformed message ends the stream."""
    iterator = aiter(requests)
    while True:
        try:
            message = await asyncio.wait_for(anext(iterator), idle_seconds if idle_seconds > 0 else None)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(
                f"no message for {idle_seconds:g} s: the stream was closed (batches acknowledged so far "
                "are committed)",
                reason=ErrorReason.STREAM_IDLE,
                metadata={"idleSeconds": f"{idle_seconds:g}"},
            ) from None
        _malformed(message)
        yield message


def rpc(scope: str, *, tenant: Callable[[Any], str] | None = None) -> Callable[[Method], Method]:
    """Guard a servicer method `(self, request, context, caller)`; see the module docstring.

    `tenant` reads the tenant a unary request is about, to charge that tenant's request
    rate. A parameter named `request_iterator` marks a client stream (the generated code's
    convention); an async generator is a server stream.
    """

    def decorate(method: Method) -> Method:
        client_streaming = "request_iterator" in inspect.signature(method).parameters
        server_streaming = inspect.isasyncgenfunction(method)
        streaming = client_streaming or server_streaming
        name = method.__name__

        @contextlib.asynccontextmanager
        async def admitted(
            self: Guarded, request: Any, context: grpc.aio.ServicerContext, rid: str
        ) -> AsyncIterator[tuple[Caller, Any]]:
            if streaming:
                await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
            else:
                # With the status rather than ahead of the response: sending initial metadata
                # early is one more operation per call, measured at 7% of a unary call's CPU.
                context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            principal = self.authenticator.principal(context.invocation_metadata() or ())
            principal.require_scope(scope)
            limiter = self.authenticator.limiter
            if client_streaming:
                request = _incoming(request, limiter.settings.stream_idle_seconds)
            else:
                _malformed(request)
            tenant_id = tenant(request) if tenant is not None else None
            limiter.request(
                principal.subject, tenant_id if tenant_id and principal.may_act_for(tenant_id) else None
            )
            if not streaming:
                yield Caller(principal, rid), request
                return
            limiter.streams.acquire(principal.subject)
            try:
                yield Caller(principal, rid), request
            finally:
                limiter.streams.release(principal.subject)

        if server_streaming:

            @functools.wraps(method)
            async def stream_wrapper(
                self: Guarded, request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                rid = request_id(context)
                call = self.telemetry.start(service_name(self), name, rid, True, context)
                try:
                    async with (
                        admitted(self, request, context, rid) as (caller, request),
                        # Closed before the stream slot is given back, whether the call ends,
                        # fails or is cancelled while a response is being sent.
                        contextlib.aclosing(method(self, request, context, caller)) as responses,
                    ):
                        call.admitted(caller.principal.subject)
                        async for response in responses:
                            yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    call.failed(exc)
                    await abort(context, exc, rid)
                except BaseException as exc:  # cancelled
                    call.failed(exc)
                    raise
                finally:
                    call.finish(context)

            return stream_wrapper

        @functools.wraps(method)
        async def unary_wrapper(self: Guarded, request: Any, context: grpc.aio.ServicerContext) -> Any:
            rid = request_id(context)
            call = self.telemetry.start(service_name(self), name, rid, streaming, context)
            try:
                async with admitted(self, request, context, rid) as (caller, request):
                    call.admitted(caller.principal.subject)
                    return await method(self, request, context, caller)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                call.failed(exc)
                await abort(context, exc, rid)
            except BaseException as exc:  # cancelled
                call.failed(exc)
                raise
            finally:
                call.finish(context)

        return unary_wrapper

    return decorate
