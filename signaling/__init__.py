"""Signaling: how peers connect (WebSocket, WHIP, WHEP) and the HTTP app wiring."""
