"""Turn datasets into WebDataset tar shards plus a manifest (see ``manifest.py``)."""
