"""Export a Twins model to ONNX with dynamic batch, height and width, and check it with onnxruntime.

    python tools/export_onnx.py --model alt_gvt_small --checkpoint alt_gvt_small.pth --output svt_s.onnx
    python tools/export_onnx.py --model alt_gvt_base --checkpoint seg.pth --pyramid --output backbone.onnx

The file takes "images" (B, 3, H, W) for any B and any H, W from 64 to --max-size, and gives
"logits" (B, classes), or with --pyramid the stage maps "stage1".."stage4" (B, C_i, H_i, W_i).
After writing it, the outputs of onnxruntime are compared with the PyTorch model's at each
--check size (a batch of two random images); the export fails if they differ by more than --atol.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from twins.checkpoint import create_with_weights  # noqa: E402
from twins.export import MIN_SIZE, Pyramid, export_onnx  # noqa: E402


def image_size(text: str) -> Tuple[int, int]:
    """'224' or '256x320' -> (H, W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 224 or 256x320, got {text!r}")
    return parts[0], parts[1]


def build(args: argparse.Namespace) -> torch.nn.Module:
    """The model of --model with the weights of --checkpoint (class count from its classifier)."""
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint {args.checkpoint} does not exist")
    model = create_with_weights(args.model, args.checkpoint).eval()
    return Pyramid(model, args.out_indices) if args.pyramid else model


def check(model: torch.nn.Module, path: Path, sizes: Sequence[Tuple[int, int]], atol: float
          ) -> List[float]:
    """Max |onnxruntime - PyTorch| over the outputs at each size; SystemExit beyond atol."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    errors = []
    for h, w in sizes:
        images = torch.randn(2, 3, h, w, generator=gen)
        with torch.no_grad():
            expected = model(images)
        expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        got = session.run(None, {"images": images.numpy()})
        error = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
        shapes = ", ".join("x".join(map(str, g.shape)) for g in got)
        print(f"{h}x{w}: outputs {shapes}, max |onnxruntime - PyTorch| {error:.2e}")
        if error > atol or any(g.shape != tuple(e.shape) for g, e in zip(got, expected)):
            raise SystemExit(f"{path}: the ONNX outputs at {h}x{w} differ from PyTorch's "
                             f"(max abs difference {error:.2e}, allowed {atol:.0e})")
        errors.append(error)
    return errors


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model name (twins.list_models())")
    parser.add_argument("--checkpoint", help="weights: official, timm, mmsegmentation or ours")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--pyramid", action="store_true",
                        help="export the stage maps (forward_pyramid) instead of the logits")
    parser.add_argument("--out-indices", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="with --pyramid: the stages to output (0-based)")
    parser.add_argument("--img-size", type=image_size, default=(224, 224),
                        help="the example size traced, H or HxW (any size in range works after)")
    parser.add_argument("--max-size", type=int, default=4096, help="largest H and W accepted")
    parser.add_argument("--check", type=image_size, nargs="*", default=None,
                        help="sizes to compare with PyTorch (default: --img-size and 97x130); "
                             "none to skip")
    parser.add_argument("--atol", type=float, default=1e-4)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[float]:
    args = parse_args(argv)
    try:
        model = build(args)
    except ValueError as err:  # unknown model, a checkpoint that does not fit
        raise SystemExit(str(err)) from None
    output = Path(args.output)
    if not output.parent.is_dir():
        raise SystemExit(f"output folder {output.parent} does not exist")
    names = [f"stage{i + 1}" for i in args.out_indices] if args.pyramid else ["logits"]
    try:
        export_onnx(model, output, args.img_size, min_size=MIN_SIZE, max_size=args.max_size,
                    output_names=names)
    except ValueError as err:  # sizes out of range
        raise SystemExit(str(err)) from None
    print(f"wrote {output} ({output.stat().st_size / 2 ** 20:.1f} MiB): images (B, 3, H, W), "
          f"H, W in {MIN_SIZE}..{args.max_size} -> {', '.join(names)}")
    sizes = [args.img_size, (97, 130)] if args.check is None else args.check
    return check(model, output, sizes, args.atol)


if __name__ == "__main__":
    main()
