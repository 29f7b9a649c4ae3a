"""stream-pml: multi-label training with partially annotated labels at scale."""

__version__ = "0.1.0"
