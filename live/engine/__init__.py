"""The engine room: the stream engine, its decode lane, the worker thread that serves sessions, and the
multi-GPU step pipeline (stage workers, mesh)."""
