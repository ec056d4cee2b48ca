"""Consumers of a session's output: the shared encoders, WebRTC tracks, RTMP push and virtual camera.

Every sink follows one small protocol (:class:`Sink`): a session starts it on its output and stops it when it
ends, so adding a consumer never touches the engine and only registers the sink with the session.
"""
