"""Twins-PCPVT and Twins-SVT vision transformers.

    from twins import create_model, list_models
    model = create_model("alt_gvt_small", num_classes=1000, drop_path_rate=0.2)

Importing the package also registers every name with timm, so `timm.create_model("alt_gvt_small")`
works; timm's own `twins_*` entries are left untouched.
"""
import difflib
import inspect
from typing import Any, List

from .configs import ALIASES, MODEL_CONFIGS, TIMM_NAMES, stage_kwargs_to_config
from .model import Block, Twins

__all__ = ["Twins", "Block", "create_model", "list_models", "twins_from_stage_kwargs",
           "MODEL_CONFIGS", "TIMM_NAMES"]

_TIMM_FACTORY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_TWINS_ARGS = set(inspect.signature(Twins.__init__).parameters) - {"self"}


def list_models(include_aliases: bool = False) -> List[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(list(MODEL_CONFIGS) + (list(ALIASES) if include_aliases else []))


def resolve_name(name: str) -> str:
    """Canonical model name, or a ValueError listing the valid ones (closest first)."""
    name = ALIASES.get(name, name)
    if name not in MODEL_CONFIGS:
        valid = list_models(include_aliases=True)
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid models: {', '.join(valid)}")
    return name


def create_model(name: str, num_classes: int = 1000, drop_path_rate: float = 0.0,
                 **overrides: Any) -> Twins:
    """Build a named Twins model; `overrides` replace any `Twins` constructor argument.

    Raises:
        ValueError: unknown model name or unknown override (both list the valid choices).
    """
    config = dict(MODEL_CONFIGS[resolve_name(name)])
    unknown = sorted(set(overrides) - _TWINS_ARGS)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for model {name!r}; "
                         f"valid: {', '.join(sorted(_TWINS_ARGS))}")
    config.update(overrides, num_classes=num_classes, drop_path_rate=drop_path_rate)
    return Twins(**config)


def twins_from_stage_kwargs(**kwargs: Any) -> Twins:
    """Build a Twins model from per-stage keywords, e.g. `s1_emb_dim=64, s1_patch_size=4,
    s1_local_patch_size=7, s1_global_k=8, s1_depth=2, s1_heads=2, s1_mlp_mult=4, ...,
    peg_kernel_size=3, dropout=0.0` (see `twins.configs.stage_kwargs_to_config`)."""
    return Twins(**stage_kwargs_to_config(**kwargs))


def _register_with_timm() -> None:
    """Make `timm.create_model(<our name>)` work, as the official repository's models did."""
    try:
        from timm.models import register_model
        from timm.models._registry import is_model
    except ImportError:  # timm is optional for the model package itself
        return

    def entrypoint(model_name: str):
        def build(pretrained: bool = False, **kwargs: Any) -> Twins:
            if pretrained:
                raise ValueError(f"{model_name}: weights are never downloaded; pass "
                                 "checkpoint_path=<file> to timm.create_model instead")
            for key in _TIMM_FACTORY_ARGS:  # bookkeeping timm's factory adds; nothing to build
                kwargs.pop(key, None)
            return create_model(model_name, **kwargs)
        build.__name__ = build.__qualname__ = model_name
        build.__module__ = __name__
        return build

    for model_name in list_models(include_aliases=True):
        if not is_model(model_name):
            register_model(entrypoint(model_name))


_register_with_timm()
