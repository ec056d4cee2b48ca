"""What every signaling handler shares: settings, the session manager, metrics, uploaded images, access rules."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from live.metrics import ServerMetrics
from live.session import SessionManager
from live.settings import Settings

from .auth import Auth
from .images import ImageStore

RETRY_AFTER_S = 10


@dataclass
class ServerState:
    """Shared state of one server (one aiohttp application)."""

    settings: Settings
    manager: SessionManager
    metrics: ServerMetrics
    images: ImageStore
    auth: Auth


STATE = web.AppKey("state", ServerState)
