"""Print the README's model table: parameters and fvcore FLOPs of every named model.

    python tools/model_table.py            # the six ImageNet models at 224x224
    python tools/model_table.py --size 256 --models alt_gvt_small
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twins import MODEL_CONFIGS, TIMM_NAMES, create_model  # noqa: E402
from twins.flops import count_flops  # noqa: E402

PAPER_NAMES = {"pcpvt_small_v0": "Twins-PCPVT-S", "pcpvt_base_v0": "Twins-PCPVT-B",
               "pcpvt_large_v0": "Twins-PCPVT-L", "alt_gvt_small": "Twins-SVT-S",
               "alt_gvt_base": "Twins-SVT-B", "alt_gvt_large": "Twins-SVT-L"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PAPER_NAMES), choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--size", type=int, default=224, help="square input side for FLOPs")
    args = parser.parse_args()
    print(f"| model | paper | timm | params | fvcore FLOPs @{args.size} |")
    print("|---|---|---|---:|---:|")
    for name in args.models:
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        flops = count_flops(model, args.size, args.size)
        print(f"| {name} | {PAPER_NAMES.get(name, '-')} | {TIMM_NAMES.get(name, '-')} | "
              f"{params:,} | {flops:,} ({flops / 1e9:.2f} G) |")


if __name__ == "__main__":
    main()
