"""orthorank: training-free token selection (OrthoRank) for HuggingFace Transformers models."""

__version__ = "0.1.0"
