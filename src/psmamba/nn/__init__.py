"""Reusable network pieces: conv blocks, SE, RMSNorm, selective-scan backends, the Mamba layer.

Nothing is imported eagerly; import the sub-modules (``psmamba.nn.blocks``,
``psmamba.nn.scan``, ``psmamba.nn.mamba``) directly.
"""
