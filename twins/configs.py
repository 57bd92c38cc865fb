"""Named Twins models: each entry states only its hyperparameters (see `Twins` for defaults).

The six ImageNet-1k models keep the official repository's names; the two `*_micro` models are
small layouts for tests and the CPU demo.
"""
from typing import Any, Dict

_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
              sr_ratios=(8, 4, 2, 1))
_SVT = dict(mlp_ratios=(4, 4, 4, 4), window_sizes=(7, 7, 7, 7), sr_ratios=(8, 4, 2, 1))

MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    # Twins-PCPVT-S/B/L (paper table 1)
    "pcpvt_small_v0": dict(_PCPVT, depths=(3, 4, 6, 3)),
    "pcpvt_base_v0": dict(_PCPVT, depths=(3, 4, 18, 3)),
    "pcpvt_large_v0": dict(_PCPVT, depths=(3, 8, 27, 3)),
    # Twins-SVT-S/B/L (ALT-GVT)
    "alt_gvt_small": dict(_SVT, embed_dims=(64, 128, 256, 512), depths=(2, 2, 10, 4),
                          num_heads=(2, 4, 8, 16)),
    "alt_gvt_base": dict(_SVT, embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2),
                         num_heads=(3, 6, 12, 24)),
    "alt_gvt_large": dict(_SVT, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                          num_heads=(4, 8, 16, 32)),
    # Tiny layouts for tests and the demo (32x32 inputs and up).
    "pcpvt_micro": dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                        mlp_ratios=(2, 2, 2, 2), sr_ratios=(4, 2, 2, 1)),
    "alt_gvt_micro": dict(embed_dims=(32, 64, 96, 128), depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4),
                          mlp_ratios=(2, 2, 2, 2), window_sizes=(4, 4, 4, 4), sr_ratios=(4, 2, 2, 1)),
}

# The official repository also registers the PCPVT models without the `_v0` suffix.
ALIASES = {"pcpvt_small": "pcpvt_small_v0", "pcpvt_base": "pcpvt_base_v0",
           "pcpvt_large": "pcpvt_large_v0"}

# timm's own names for the six ImageNet models (its `twins_*` entries).
TIMM_NAMES = {"pcpvt_small_v0": "twins_pcpvt_small", "pcpvt_base_v0": "twins_pcpvt_base",
              "pcpvt_large_v0": "twins_pcpvt_large", "alt_gvt_small": "twins_svt_small",
              "alt_gvt_base": "twins_svt_base", "alt_gvt_large": "twins_svt_large"}
