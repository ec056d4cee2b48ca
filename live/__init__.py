"""The runtime: engine loop, sessions, audio window, frame ring, A/V clock, tracks and sinks."""
