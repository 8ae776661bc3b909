"""psmamba: PSMamba-Net deformable registration for 3-D medical images.

Importing the package is cheap and needs neither a GPU nor ``mamba_ssm``; the
sub-modules (``psmamba.spatial``, ``psmamba.models``, ...) are imported on use.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "PsmambaError"]

from psmamba.errors import PsmambaError  # noqa: E402  (tiny module, no heavy imports)
