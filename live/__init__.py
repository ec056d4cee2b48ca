"""The runtime: sessions and their peers, settings, metrics; engine/, stream/ and sinks/ hold the parts."""
