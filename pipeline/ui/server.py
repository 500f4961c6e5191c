"""Serving the UI: on 127.0.0.1 (the default) for this machine's user only; on any other address only with
an access token, printed at start, that every request must carry (in the printed address's ?token=, then
a cookie), so that nobody else on the network can start runs or write files. Without it, a request is
refused in one line. On the loopback address, requests must name a loopback host (a web page elsewhere
cannot reach the UI by DNS rebinding), and a form posted from another site's page (its Origin) is refused."""

from __future__ import annotations

import hmac
import secrets
import socket
from pathlib import Path

import click

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
COOKIE = "prior_lora_ui_token"


class Guard:
    """ASGI middleware: the token (when there is one), the loopback host and the origin of posted forms."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse, RedirectResponse

        request = Request(scope)
        refusal = self.refusal(request)
        if refusal:
            return await PlainTextResponse(f"error: {refusal}\n", status_code=403)(scope, receive, send)
        given = request.query_params.get("token")
        if self.token and given:  # the printed address: keep the token in a cookie, drop it from the address
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, request) -> str:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0]
        if self.token:
            given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                     or request.headers.get("authorization", "").removeprefix("Bearer "))
            if not given or not hmac.compare_digest(given, self.token):
                return "this UI needs its access token: open the address it printed at start (…/?token=…)"
        elif host not in LOOPBACK:
            return f"this UI answers on 127.0.0.1 only, not as '{host}' (start it with --host to serve other names)"
        origin = request.headers.get("origin")
        if request.method == "POST" and origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            return f"a form posted from another site ({origin}) is refused"
        return ""


def serve(host: str, port: int, projects: Path) -> None:
    import uvicorn

    from pipeline.ui.app import make_app

    token = None if host in LOOPBACK else secrets.token_urlsafe(24)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))  # bound here, so that --port 0 prints the port it got
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    address = f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
    projects.mkdir(parents=True, exist_ok=True)
    app = make_app(projects, [])
    click.echo(f"ui: {address} (projects: {projects.resolve()}; Ctrl-C stops the UI, not its runs)", err=True)
    if token:
        click.echo(f"ui: access token {token}: every request must carry it (the address above sets it)", err=True)
    config = uvicorn.Config(Guard(app, token), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
