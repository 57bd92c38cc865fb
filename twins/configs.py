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

# Per-stage keyword spelling (`s1_emb_dim`, `s2_depth`, ...) -> generic constructor argument.
STAGE_KWARGS = {"emb_dim": "embed_dims", "patch_size": "patch_sizes", "local_patch_size": "window_sizes",
                "global_k": "sr_ratios", "depth": "depths", "heads": "num_heads", "mlp_mult": "mlp_ratios"}
_GLOBAL_KWARGS = {"peg_kernel_size": "peg_kernel_size", "dropout": "drop_rate",
                  "num_classes": "num_classes", "drop_path_rate": "drop_path_rate"}


def stage_kwargs_to_config(**kwargs: Any) -> Dict[str, Any]:
    """Translate the per-stage keyword API into `Twins` arguments.

    `s<i>_<field>` for stages i = 1..S with field in STAGE_KWARGS (every stage must give every
    field), plus peg_kernel_size, dropout, num_classes and drop_path_rate. `local_patch_size` 0
    makes a stage GSA-only; `global_k` is the GSA sub-sampling ratio.

    Raises:
        ValueError: an unknown keyword, or a stage missing a field.
    """
    per_stage: Dict[str, Dict[int, Any]] = {field: {} for field in STAGE_KWARGS}  # field -> stage -> value
    config: Dict[str, Any] = {}
    for key, value in kwargs.items():
        stage, _, field = key.partition("_")
        if key in _GLOBAL_KWARGS:
            config[_GLOBAL_KWARGS[key]] = value
        elif stage[:1] == "s" and stage[1:].isdigit() and field in STAGE_KWARGS:
            per_stage[field][int(stage[1:])] = value
        else:
            raise ValueError(f"unknown keyword {key!r}: expected s<i>_<{'|'.join(STAGE_KWARGS)}> "
                             f"or one of {', '.join(_GLOBAL_KWARGS)}")
    stages = sorted(set().union(*per_stage.values()))
    if stages != list(range(1, len(stages) + 1)):
        raise ValueError(f"stages must be numbered 1..S without gaps, got {stages}")
    missing = [f"s{i}_{field}" for field, values in per_stage.items() for i in stages if i not in values]
    if missing:
        raise ValueError(f"missing per-stage keyword(s): {', '.join(missing)}")
    for field, values in per_stage.items():
        config[STAGE_KWARGS[field]] = [values[i] for i in stages]
    return config
