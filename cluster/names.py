"""Names shared by everything in the cluster: Ray namespace, the slot resource, actor names."""

from __future__ import annotations

NAMESPACE = "live-avatar"
SLOT_RESOURCE = "avatar_slots"
HEAD_RESOURCE = "node:__internal_head__"


def registry_name(profile: str) -> str:
    """The detached registry actor of one profile (every front door of that profile finds it by this name)."""
    return f"registry:{profile}"


def host_name(profile: str, node_id: str) -> str:
    """The detached avatar host actor of one profile on one node."""
    return f"host:{profile}:{node_id}"
