"""Checkpoint files below every layer that writes or reads them: the manifest protocol (``manifest``),
sha256 digests taken while the files are written (``hashing``), and pickles read as data through
allow-lists (``unpickle``). Nothing here knows a strategy, a model or a config."""
