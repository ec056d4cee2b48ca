"""A session's timeline between mic and outputs: audio feed and window, frame ring, clock, output pump."""
