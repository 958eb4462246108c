"""Routing errors as the contract's JSON error body, on the worker's and ``finflow api``'s
web servers alike.

The routes answer their own errors as ``{"error": "<code>", "message": "..."}``; aiohttp's
router answers a path no route matches (``/accounts//aggregates``, an unencoded ``/`` in an
account id) or a method a route does not take with plain text. This middleware gives those
the same JSON body, keeping aiohttp's status and ``Allow`` header.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

CODES = {404: "not_found", 405: "method_not_allowed"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        body = {
            "error": CODES.get(exc.status, "http_error"),
            "message": f"{exc.reason}: {request.method} {request.rel_url.raw_path}",
        }
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(body, status=exc.status, headers=headers)
