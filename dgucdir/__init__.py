"""dgucdir: distributed domain-generalized unsupervised cross-domain image retrieval."""

__version__ = "0.1.0"
