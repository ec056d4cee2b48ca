"""Training of the built-in tiny avatar on synthetic talking faces (uses model/ only)."""
