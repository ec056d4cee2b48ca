"""What a front door's handlers share: its settings, the cluster's access rules, the registry, an HTTP client to the
hosts, and the few steps every route takes (place a session, find the host of one, forward a request to it, explain
a lost host)."""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from PIL import Image
from ray.actor import ActorHandle

from live.images import builtin_characters
from live.settings import Settings
from signaling.auth import Auth
from signaling.images import ALLOWED_FORMATS, ImageStore

from .placement import Located, Placement, Refusal

log = logging.getLogger(__name__)

# hop-by-hop headers and those aiohttp sets itself stay behind; everything else (Host, auth, tokens, Origin) goes
# through, so a host checks a request as it would check it from the client itself
LOCAL_HEADERS = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding",
    "Upgrade", "Content-Length", "Content-Encoding", "Date", "Server", "X-Forwarded-For"))
PROBE_TIMEOUT_S = 2.0
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)


class HostUnreachable(RuntimeError):
    """A host did not answer a forwarded request (refused, reset or timed out)."""


@dataclass
class FrontDoor:
    """The shared state of one front door (one aiohttp application)."""

    settings: Settings
    address: str
    registry: ActorHandle
    images: ImageStore
    auth: Auth
    http: aiohttp.ClientSession | None = None

    async def place(self) -> Placement | Refusal:
        """Reserve a slot for a new session (least loaded host of this profile)."""
        return await self.registry.place.remote()

    async def settle(self, placement: Placement, session_id: str | None) -> None:
        """The placed session started (its id) or not (None)."""
        await self.registry.settle.remote(placement, session_id)

    async def locate(self, session_id: str) -> str:
        """The URL of the host running ``session_id``; 404 when unknown, 410 with the reason when its host died."""
        where: Located | None = await self.registry.locate.remote(session_id)
        if where is None:
            raise web.HTTPNotFound(text=f"no session {session_id!r} is running")
        if where.ended is not None:
            raise web.HTTPGone(text=f"session {session_id} ended: {where.ended}")
        return where.url

    async def forward(self, request: web.Request, base_url: str, body: bytes | None = None,
                      path_qs: str | None = None) -> web.Response:
        """Send ``request`` (its method, path and query, ``body``) to the host at ``base_url``; its answer, as is."""
        url = base_url + (path_qs or request.path_qs)
        try:
            async with self.http.request(request.method, url, data=body, headers=forwarded_headers(request),
                                         timeout=FORWARD_TIMEOUT) as resp:
                data = await resp.read()
                return web.Response(status=resp.status, body=data, headers=_end_to_end(resp.headers))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise HostUnreachable(f"avatar host {base_url} did not answer: {exc.__class__.__name__}: {exc}") from exc

    async def host_image(self, base_url: str, image: str | None) -> str | None:
        """The name ``base_url``'s host knows ``image`` by: samples and the default as they are, an image uploaded
        to the cluster uploaded to that host first (an unknown id as it is, for the host to refuse)."""
        if not image or image == "default" or image in builtin_characters():
            return image
        data = await self.registry.get_image.remote(image)
        if data is None:
            return image
        content_type = ALLOWED_FORMATS.get(Image.open(io.BytesIO(data)).format, "image/png")
        try:
            async with self.http.post(base_url + "/api/images", data=data, headers={"Content-Type": content_type},
                                      timeout=FORWARD_TIMEOUT) as resp:
                body = await resp.json()
                if resp.status != 201:
                    raise web.HTTPBadRequest(text=body.get("message", f"the host refused the image ({resp.status})"))
                return body["image_id"]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise HostUnreachable(f"avatar host {base_url} did not answer: {exc.__class__.__name__}: {exc}") from exc

    async def lost(self, placement: Placement, what: str) -> str:
        """The connection to a session's host ended without a goodbye: the ``ended`` reason to give its peers.

        A host whose HTTP port refuses is dead: the registry takes it out of placement at once, before Ray notices.
        """
        try:
            async with self.http.get(placement.url + "/health",
                                     timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as resp:
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            reason = (f"avatar host {placement.node_ip} died ({what}; its server does not answer: "
                      f"{exc.__class__.__name__})")
            await self.registry.report_lost.remote(placement.node_id, reason)
            log.warning("%s", reason)
            return reason
        return f"lost the connection to avatar host {placement.node_ip} ({what})"


def forwarded_headers(request: web.Request) -> dict[str, str]:
    """The client's end-to-end headers for the host, with the client's address appended to ``X-Forwarded-For``."""
    chain = [h for h in (request.headers.get("X-Forwarded-For"), request.remote) if h]
    return {**_end_to_end(request.headers), "X-Forwarded-For": ", ".join(chain)}


def _end_to_end(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in LOCAL_HEADERS}


FRONT_DOOR = web.AppKey("front_door", FrontDoor)
