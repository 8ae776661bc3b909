"""psmamba: PSMamba-Net deformable registration for 3-D medical images.

Importing the package is cheap and needs neither a GPU nor ``mamba_ssm``; the
sub-modules (``psmamba.spatial``, ``psmamba.models``, ...) are imported on use.

``psmamba.register(fixed, moving, out="result")`` registers two images the way
``psmamba register`` does (by default: affine, the shipped network, then diffeomorphic
refinement; affine then refinement where no network is installed);
``psmamba.apply("result/ddf.nii.gz", "moving_labels.nii.gz", labels=True, out=...)`` carries
another image through its map, as ``psmamba apply`` does.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "PsmambaError", "register", "apply"]

from psmamba.errors import PsmambaError  # noqa: E402  (tiny module, no heavy imports)


def register(fixed, moving, *, out=None, method=None, **options):
    """Register ``moving`` onto ``fixed``: ``psmamba register`` in Python.

    Args:
        fixed, moving: paths (NIfTI, Analyze), :class:`psmamba.io.Image` objects or 3-D arrays.
        out: a folder to write the outputs to (``warped.nii.gz``, ``ddf.nii.gz``,
            ``ddf_inverse.nii.gz``, ``affine.txt``, ``summary.json``, ...; with ``itk=True`` also
            ``warp_itk.nii.gz`` and ``warp_itk_inverse.nii.gz`` for ANTs/ITK), or None.
        method: ``"default"`` (None), ``"identity"``, ``"affine"``, ``"io"``, ``"affine+io"``,
            ``"network"``, ``"network+io"``, ``"affine+network+io"``, ...
        options: any keyword of :func:`psmamba.engine.register.register_pair` (``fixed_labels``,
            ``moving_labels``, ``checkpoint``, ``similarity="mi"``, ``fixed_mask``, ...).

    Returns:
        :class:`psmamba.engine.register.RegistrationResult`.
    """
    from psmamba.engine.register import register_pair

    return register_pair(fixed, moving, out_dir=out, method=method, **options)


def apply(field, image, *, out=None, **options):
    """Carry ``image`` through a registration's ``field``: ``psmamba apply`` in Python.

    Args:
        field: ``ddf.nii.gz`` (moving onto fixed), ``ddf_inverse.nii.gz`` (fixed onto moving) or
            an ITK / ANTs displacement field.
        image: a path, :class:`psmamba.io.Image` or array in the world space of the map's source:
            a 3-D volume or a 4-D series ``(D, H, W, T)``, volume by volume.
        out: a file to write the result to, or None.
        options: any keyword of :func:`psmamba.engine.apply.apply_field` (``labels=True``,
            ``reference``, ``padding``, ``device``).

    Returns:
        :class:`psmamba.io.Image` on the field's grid.
    """
    from psmamba.engine.apply import apply_field

    return apply_field(field, image, out=out, **options)
