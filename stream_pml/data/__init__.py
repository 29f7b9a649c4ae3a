"""Data path: shard lists per rank and loaders that turn shards into :class:`Batch` objects."""
