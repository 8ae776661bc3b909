"""``psmamba apply``: carry an image or a label map through a registration's map."""

from __future__ import annotations

import argparse

HELP = "carry an image or label map through a registration's field (ddf.nii.gz, ddf_inverse.nii.gz, an ITK/ANTs warp)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--field", required=True, metavar="DDF",
                        help="the map: register's ddf.nii.gz (moving onto fixed), ddf_inverse.nii.gz (fixed onto "
                        "moving), or an ITK/ANTs displacement field (warp_itk.nii.gz, antsApplyTransforms' composite)")
    parser.add_argument("--image", required=True, metavar="IMG",
                        help="the image to carry, on any grid, in the world space of the map's source (the moving "
                        "image for ddf.nii.gz: its label map, another scan of the same session, ...); a 4-D "
                        "series (fMRI, diffusion) goes through volume by volume")
    parser.add_argument("--out", required=True, metavar="OUT", help="the result (.nii.gz, .nii, .hdr/.img) on the "
                        "field's grid; its folder is created")
    parser.add_argument("--labels", action="store_true",
                        help="the image is a label map: nearest neighbour, integer codes kept (in the smallest integer type that holds them)")
    parser.add_argument("--reference", metavar="REF",
                        help="an image on the field's grid (the fixed image for ddf.nii.gz): checked against the "
                        "field, and its affine used when the field's file has none (a Learn2Reg field)")
    parser.add_argument("--padding", type=float, default=0.0,
                        help="the value outside the image (default 0; e.g. -1024 for CT in HU)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")


def run(args: argparse.Namespace) -> int:
    from psmamba.checks import check_number
    from psmamba.engine.apply import apply_field
    from psmamba.errors import PsmambaError

    check_number("--padding", args.padding)
    if args.labels and args.padding:
        raise PsmambaError("--padding is the outside value of an image; a label map's outside is 0 (background)")
    result = apply_field(args.field, args.image, reference=args.reference, labels=args.labels, out=args.out,
                         device=args.device, padding=args.padding)
    shape = "x".join(str(s) for s in result.data.shape)
    print(f"wrote {result.path} ({shape}{', labels' if args.labels else ''})")
    return 0
