"""Checkpoint I/O for Twins: safe loading, container and layout detection, key conversion, saving.

Every checkpoint this repository reads or writes goes through this module:

* ``torch_load`` reads ``.pth`` files with ``weights_only=True`` (the pickle may only build
  tensors, plain containers and ``argparse.Namespace``, which official training checkpoints
  use for ``args``) and ``.safetensors`` files with safetensors.
* ``extract_state_dict`` finds the weights in official/DeiT, timm and mmsegmentation files and
  returns them under the official key names.
* ``official_to_mmseg`` / ``mmseg_to_official`` convert between the official backbone keys and
  those of mmsegmentation's Twins backbone.
* ``load_pretrained`` loads into a model and explains every mismatch in one error.
* ``save_atomic`` / ``save_safetensors`` never leave a half-written file behind.

Command line: ``python -m twins.checkpoint convert IN OUT --to {official,mmseg}``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import pickletools
import re
import sys
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    'CheckpointMismatchError', 'LoadReport', 'UnsafeCheckpointError', 'convert_checkpoint',
    'extract_state_dict', 'load_pretrained', 'mmseg_to_official', 'official_to_mmseg',
    'save_atomic', 'save_safetensors', 'torch_load',
]

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, 'os.PathLike[str]']

# Official training checkpoints store the argparse arguments under 'args'; nothing else is
# allowed beyond torch's own weights-only set (tensors, storages, plain containers).
_SAFE_GLOBALS = [argparse.Namespace]

# Where the weights sit inside a training checkpoint: official/DeiT ('model', 'model_ema'),
# timm and mmsegmentation ('state_dict', timm's 'state_dict_ema').
_WEIGHT_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema')
_EMA_KEYS = ('model_ema', 'state_dict_ema')

# Top-level modules and key fragments of mmsegmentation's Twins backbone (FACTS.md mapping table).
_MMSEG_ROOTS = ('patch_embeds.', 'position_encodings.', 'layers.', 'norm_list.')
_MMSEG_MARKERS = ('.projection.', 'attn.attn.in_proj_', 'ffn.layers.', 'position_encodings.', 'norm_list.')

_MAX_LISTED = 10
_GLOBAL_NAME = re.compile(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)+')


class UnsafeCheckpointError(ValueError):
    """The file's pickle needs a global outside the allow-list, i.e. loading it could run code."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did not load.

    Args:
        missing: model keys the checkpoint had no weights for (they keep their initialisation).
        unexpected: checkpoint keys the model has no parameter for (ignored; only with strict=False).
        dropped_head: classifier keys removed from the checkpoint because of fine-tuning.
    """

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    dropped_head: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def torch_load(path: PathLike, map_location: Union[str, torch.device] = 'cpu') -> Any:
    """Read a checkpoint without ever executing code from it.

    Args:
        path: a file written by ``torch.save`` or a ``.safetensors`` file.
        map_location: device for the tensors.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: unpickling would need a global outside the allow-list.
        ValueError: the file is not a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if path.is_dir():
        raise ValueError(f'{path} is a directory; expected a checkpoint file (.pth or .safetensors)')
    if path.suffix == '.safetensors' or _looks_like_safetensors(path):
        return _load_safetensors(path, map_location)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            # Files pickled with protocol > 2 load fine or fail with the clearer error below.
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.load fails on foreign bytes with many types
        raise _explain_load_error(path, err) from err


def _looks_like_safetensors(path: Path) -> bool:
    """True if the file starts like safetensors: an 8-byte header length, then a JSON object."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b'{':
        return False
    return int.from_bytes(head[:8], 'little') < path.stat().st_size


def _load_safetensors(path: Path, map_location: Union[str, torch.device]) -> StateDict:
    """Read a safetensors file (it holds tensors only, so there is nothing to execute)."""
    from safetensors.torch import load_file  # imported here: only needed for this format

    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f'map_location for safetensors must be a device, got {type(map_location).__name__}')
    try:
        return load_file(path, device=str(map_location))
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f'{path} is not a valid safetensors file: {err}') from err


def _explain_load_error(path: Path, err: Exception) -> ValueError:
    """Turn a failed weights-only load into UnsafeCheckpointError or a plain ValueError."""
    offending = _offending_globals(path, err)
    if offending:
        others = f' (and also {", ".join(offending[1:4])})' if len(offending) > 1 else ''
        return UnsafeCheckpointError(
            f'refusing to load {path}: unpickling it needs the global {offending[0]}{others}, which '
            'could run arbitrary code; nothing from the file was executed. Only tensors, plain '
            'containers and argparse.Namespace are accepted. If you trust the file, load it once with '
            'torch.load(..., weights_only=False) and re-save its state dict with '
            'twins.checkpoint.save_atomic.')
    # torch's weights-only message is long; its 'Unsupported ...' line is the informative one.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith('Unsupported')), lines[0] if lines else '')
    if path.stat().st_size == 0:
        reason = 'the file is empty'
    return ValueError(f'{path} could not be read as a PyTorch checkpoint ({type(err).__name__}: '
                      f'{reason[:200]}); expected a file written by torch.save or a .safetensors file')


def _offending_globals(path: Path, err: Exception) -> List[str]:
    """Name the globals that made the weights-only unpickler refuse the file.

    torch names the global itself when it reaches one; it stops earlier on opcodes it does not
    support (for example a protocol-4 pickle), so then the pickle is scanned statically.
    """
    named = re.findall(r'GLOBAL ([\w.]+)', str(err))
    if named:
        return list(dict.fromkeys(named))
    scanned = _scan_pickle_globals(path)
    return [name for name in scanned if not _is_allowed_global(name)]


def _is_allowed_global(name: str) -> bool:
    """Globals a plain state-dict checkpoint legitimately contains (torch's rebuild helpers)."""
    return name.split('.')[0] == 'torch' or name in ('collections.OrderedDict', 'argparse.Namespace',
                                                      '_codecs.encode')


def _scan_pickle_globals(path: Path) -> List[str]:
    """List the globals a pickle imports, by reading its opcodes (never executing them)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith('data.pkl')]
            if not pickles:
                return []
            with archive.open(pickles[0]) as f:
                return list(dict.fromkeys(_globals_in_stream(f, max_pickles=1)))
    with open(path, 'rb') as f:
        # The legacy torch format is several pickles in a row before the raw storages.
        return list(dict.fromkeys(_globals_in_stream(f, max_pickles=5)))


def _globals_in_stream(f: BinaryIO, max_pickles: int) -> Iterator[str]:
    """Yield 'module.name' for every GLOBAL, INST and STACK_GLOBAL opcode in consecutive pickles."""
    for _ in range(max_pickles):
        memo: Dict[int, Optional[str]] = {}
        pushed: List[Optional[str]] = []  # what each opcode pushed, if a string (module/name candidates)
        try:
            for op, arg, _pos in pickletools.genops(f):
                name = None
                if op.name in ('GLOBAL', 'INST'):
                    name = arg.replace(' ', '.')
                elif op.name == 'STACK_GLOBAL':  # module and name are the two strings pushed last
                    name = '.'.join(map(str, pushed[-2:]))
                if name is not None and _GLOBAL_NAME.fullmatch(name):
                    yield name  # (garbage that happens to parse as an opcode rarely forms such a name)
                if op.name == 'MEMOIZE':
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ('GET', 'BINGET', 'LONG_BINGET'):
                    pushed.append(memo.get(arg))
                else:
                    pushed.append(arg if 'UNICODE' in op.name or 'STRING' in op.name else None)
        except (ValueError, EOFError, pickle.UnpicklingError):
            return  # not (or no longer) a pickle: the raw storage bytes or garbage follow


# ----------------------------------------------------------------------------------------------
# Finding the state dict
# ----------------------------------------------------------------------------------------------

def extract_state_dict(obj: Any, prefer_ema: bool = False, source: str = 'checkpoint') -> StateDict:
    """Return the weights of a loaded checkpoint under the official Twins key names.

    Accepts a bare state dict, official/DeiT ``{'model': ...}`` (``'model_ema'`` with
    prefer_ema), timm/mmsegmentation ``{'state_dict': ...}``, timm ``{'state_dict_ema': ...}``;
    strips DDP ``module.`` prefixes, keeps only ``backbone.*`` of an mmsegmentation segmentor
    and converts the mmsegmentation backbone layout.

    Args:
        obj: what ``torch_load`` returned.
        prefer_ema: take the EMA weights; an error if the checkpoint has none.
        source: name of the file, for error messages.
    """
    state_dict = _find_weights(obj, prefer_ema, source)
    state_dict = {_strip_prefix(key, 'module.'): value for key, value in state_dict.items()}
    if any(key.startswith('backbone.') for key in state_dict):
        # An mmsegmentation segmentor: the neck and heads are not part of the Twins network.
        state_dict = {key[len('backbone.'):]: value for key, value in state_dict.items()
                      if key.startswith('backbone.')}
    if _is_mmseg_layout(state_dict):
        state_dict = mmseg_to_official(state_dict)
    return state_dict


def _find_weights(obj: Any, prefer_ema: bool, source: str) -> StateDict:
    """Pick the mapping of tensors out of a checkpoint container (or the bare state dict)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f'{source}: expected a state dict or a checkpoint dict, got {type(obj).__name__}')
    candidates = _EMA_KEYS if prefer_ema else _WEIGHT_KEYS
    found = next((key for key in candidates if isinstance(obj.get(key), Mapping)), None)
    if found is None and prefer_ema:
        raise ValueError(f"{source}: prefer_ema=True but there are no EMA weights ('model_ema' or "
                         f"'state_dict_ema'); top-level keys: {_preview(list(obj))}")
    weights = obj[found] if found is not None else obj
    where = f"under '{found}'" if found else 'at the top level'
    if not weights:
        raise ValueError(f'{source}: the state dict {where} is empty')
    not_tensors = [key for key, value in weights.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f'{source}: found no state dict {where}: {_preview(not_tensors)} are not tensors; '
                         f"expected a bare state dict or one under {', '.join(map(repr, _WEIGHT_KEYS))}")
    return dict(weights)


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _is_mmseg_layout(state_dict: Mapping[str, Any]) -> bool:
    """True if the keys are those of mmsegmentation's Twins backbone rather than the official ones.

    A marker alone is not enough: other networks (Swin's 'layers.', any mmcv FFN's 'ffn.layers.')
    share them, and load_pretrained also serves e.g. timm distillation teachers.
    """
    return any(key.startswith(_MMSEG_ROOTS) and any(marker in key for marker in _MMSEG_MARKERS)
               for key in state_dict)


# ----------------------------------------------------------------------------------------------
# Official <-> mmsegmentation key conversion
# ----------------------------------------------------------------------------------------------

# (official prefix, mmsegmentation prefix) with {i} = stage and {j} = block; every key is a prefix
# plus 'weight' or 'bias'. GSA's q/kv/proj are not here: they change shape, see the functions.
_PREFIX_RULES = (
    ('patch_embeds.{i}.proj.', 'patch_embeds.{i}.projection.'),
    ('patch_embeds.{i}.norm.', 'patch_embeds.{i}.norm.'),
    ('pos_block.{i}.proj.0.', 'position_encodings.{i}.proj.'),
    ('out_norms.{i}.', 'norm_list.{i}.'),
    ('blocks.{i}.{j}.norm1.', 'layers.{i}.{j}.norm1.'),
    ('blocks.{i}.{j}.norm2.', 'layers.{i}.{j}.norm2.'),
    ('blocks.{i}.{j}.attn.qkv.', 'layers.{i}.{j}.attn.qkv.'),
    ('blocks.{i}.{j}.attn.proj.', 'layers.{i}.{j}.attn.proj.'),  # LSA only; GSA's becomes out_proj
    ('blocks.{i}.{j}.attn.sr.', 'layers.{i}.{j}.attn.sr.'),
    ('blocks.{i}.{j}.attn.norm.', 'layers.{i}.{j}.attn.norm.'),
    ('blocks.{i}.{j}.mlp.fc1.', 'layers.{i}.{j}.ffn.layers.0.0.'),
    ('blocks.{i}.{j}.mlp.fc2.', 'layers.{i}.{j}.ffn.layers.1.'),
)


def _compile_prefix(template: str) -> 're.Pattern[str]':
    pattern = re.escape(template).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{j\}', r'(?P<j>\d+)')
    return re.compile(pattern + r'(?P<leaf>weight|bias)')


_TO_MMSEG = [(_compile_prefix(official), mmseg) for official, mmseg in _PREFIX_RULES]
_TO_OFFICIAL = [(_compile_prefix(mmseg), official) for official, mmseg in _PREFIX_RULES]
# GSA attention keys; 'ij' is '<stage>.<block>'.
_OFFICIAL_GSA = re.compile(r'blocks\.(?P<ij>\d+\.\d+)\.attn\.(?P<part>q|kv|proj)\.(?P<leaf>weight|bias)')
_MMSEG_GSA = re.compile(
    r'layers\.(?P<ij>\d+\.\d+)\.attn\.attn\.(?P<part>in_proj_|out_proj\.)(?P<leaf>weight|bias)')


def _rename(key: str, rules: Sequence[Tuple['re.Pattern[str]', str]], layout: str) -> str:
    """Rename one key with the first matching rule; unknown keys are an error, not passed through."""
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match:
            return target.format(**match.groupdict()) + match['leaf']
    raise ValueError(f"'{key}' is not a key of the {layout} Twins backbone layout; "
                     'is this a Twins checkpoint?')


def official_to_mmseg(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert official Twins keys to mmsegmentation's Twins backbone keys.

    GSA's ``attn.q`` and ``attn.kv`` become ``attn.attn.in_proj_*`` (concatenated [q; kv] along
    dim 0, as nn.MultiheadAttention stores them) and its ``attn.proj`` becomes
    ``attn.attn.out_proj``; LSA keeps ``attn.qkv``/``attn.proj``. The classifier ``head.*`` and the
    final ``norm.*`` are dropped: mmsegmentation's backbone has neither.
    """
    gsa_blocks = {m['ij'] for m in map(_OFFICIAL_GSA.fullmatch, state_dict) if m and m['part'] == 'q'}
    converted: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith(('head.', 'norm.')):
            continue
        match = _OFFICIAL_GSA.fullmatch(key)
        if match and match['ij'] in gsa_blocks:
            layer, leaf = f"layers.{match['ij']}.attn.attn.", match['leaf']
            if match['part'] == 'q':
                kv_key = f"blocks.{match['ij']}.attn.kv.{leaf}"
                if kv_key not in state_dict:
                    raise ValueError(f"'{key}' has no matching '{kv_key}'; cannot build in_proj_{leaf}")
                converted[f'{layer}in_proj_{leaf}'] = torch.cat([value, state_dict[kv_key]], dim=0)
            elif match['part'] == 'proj':
                converted[f'{layer}out_proj.{leaf}'] = value
            continue  # 'kv' was merged into in_proj together with 'q'
        converted[_rename(key, _TO_MMSEG, 'official')] = value
    return converted


def mmseg_to_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert mmsegmentation's Twins backbone keys (without ``backbone.``) to the official ones.

    The inverse of ``official_to_mmseg``: ``in_proj_*`` is split into q (the first dim rows,
    dim = rows / 3) and kv (the remaining 2 * dim rows). ``norm_list.i`` becomes ``out_norms.i``.
    """
    converted: StateDict = {}
    for key, value in state_dict.items():
        match = _MMSEG_GSA.fullmatch(key)
        if match is None:
            converted[_rename(key, _TO_OFFICIAL, 'mmsegmentation')] = value
            continue
        block, leaf = f"blocks.{match['ij']}.attn.", match['leaf']
        if match['part'] == 'out_proj.':
            converted[f'{block}proj.{leaf}'] = value
            continue
        rows = value.shape[0]
        if rows % 3:
            raise ValueError(f"'{key}' has {rows} rows; in_proj must hold q, k and v of equal size")
        dim = rows // 3
        converted[f'{block}q.{leaf}'] = value[:dim]  # (3 * dim, ...) -> (dim, ...)
        converted[f'{block}kv.{leaf}'] = value[dim:]  # (3 * dim, ...) -> (2 * dim, ...)
    return converted


# ----------------------------------------------------------------------------------------------
# Loading into a model
# ----------------------------------------------------------------------------------------------

def load_pretrained(model: nn.Module, path_or_state_dict: Union[PathLike, Mapping[str, Any]],
                    finetune: bool = False, prefer_ema: bool = False, strict: bool = True, *,
                    source: Optional[str] = None) -> LoadReport:
    """Load any supported checkpoint into a Twins model.

    Args:
        model: the model (official key names, e.g. from ``twins.create_model``).
        path_or_state_dict: a checkpoint file, or an already loaded checkpoint / state dict.
        finetune: drop the checkpoint's classifier when the model's differs (other class count or
            no head), and let per-stage output norms the checkpoint lacks keep their initialisation.
        prefer_ema: load the EMA weights of the checkpoint.
        strict: raise on missing or unexpected keys (shape mismatches always raise). Weights from
            backbone-only checkpoints (mmsegmentation) may leave ``norm.*`` and ``head.*`` missing.
        source: the file name for messages when passing an already loaded checkpoint.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit the model.
    """
    if isinstance(path_or_state_dict, Mapping):
        obj, source = path_or_state_dict, source or 'state dict'
    else:
        obj, source = torch_load(path_or_state_dict), source or str(path_or_state_dict)
    state_dict = extract_state_dict(obj, prefer_ema=prefer_ema, source=source)
    backbone_only = not any(key.startswith(('head.', 'norm.')) for key in state_dict)
    model_state = model.state_dict()
    dropped = _drop_head_for_finetune(state_dict, model_state, finetune, source)

    mismatched = [k for k in state_dict if k in model_state and state_dict[k].shape != model_state[k].shape]
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    tolerated = _tolerated_missing(missing, backbone_only, bool(dropped), finetune)
    if mismatched or (strict and (unexpected or set(missing) - set(tolerated))):
        raise CheckpointMismatchError(_mismatch_message(
            source, state_dict, model_state, mismatched, missing, unexpected, finetune))
    untouched = [key for key in tolerated if key not in dropped]  # the drop note covered those
    if untouched:
        print(f'{source}: no weights for {_preview(untouched)}; they keep their initialisation')
    model.load_state_dict(state_dict, strict=False)
    return LoadReport(missing=missing, unexpected=unexpected, dropped_head=dropped)


def create_with_weights(name: str, path: Optional[PathLike] = None, **kwargs: Any) -> nn.Module:
    """``twins.create_model(name, **kwargs)`` with the weights of the checkpoint file ``path``
    (any format ``load_pretrained`` reads), its class count taken from the checkpoint's
    classifier (1000 without one); without ``path``, the model's own initial weights."""
    from . import create_model  # the package imports this module's users, not the reverse

    state_dict = None if path is None else extract_state_dict(torch_load(path), source=str(path))
    num_classes = state_dict['head.weight'].shape[0] if state_dict and 'head.weight' in state_dict else 1000
    model = create_model(name, num_classes=num_classes, **kwargs)
    if state_dict is not None:
        load_pretrained(model, state_dict, source=str(path))
    return model


def _drop_head_for_finetune(state_dict: StateDict, model_state: Mapping[str, torch.Tensor],
                            finetune: bool, source: str) -> List[str]:
    """When fine-tuning, remove a classifier that does not fit the model; returns the removed keys."""
    head_keys = [key for key in ('head.weight', 'head.bias') if key in state_dict]
    fits = all(key in model_state and model_state[key].shape == state_dict[key].shape for key in head_keys)
    if not finetune or not head_keys or fits:
        return []
    first = head_keys[0]
    old = list(state_dict[first].shape)
    if first in model_state:
        new = list(model_state[first].shape)
        note = f'model has {new}: fine-tuning to {new[0]} classes'
    else:
        note = 'model has no classifier (num_classes=0)'
    print(f'{source}: dropping classifier {first} {old} -> {note}')
    for key in head_keys:
        del state_dict[key]
    return head_keys


def _tolerated_missing(missing: Sequence[str], backbone_only: bool, head_dropped: bool,
                       finetune: bool) -> List[str]:
    """Missing keys that are expected rather than a mistake."""
    def tolerated(key: str) -> bool:
        if key.startswith('head.'):
            return backbone_only or head_dropped
        if key.startswith('norm.'):
            return backbone_only  # mmsegmentation's backbone has no final norm
        return finetune and key.startswith('out_norms.')  # new per-stage norms for dense prediction
    return [key for key in missing if tolerated(key)]


def _mismatch_message(source: str, state_dict: Mapping[str, torch.Tensor],
                      model_state: Mapping[str, torch.Tensor], mismatched: Sequence[str],
                      missing: Sequence[str], unexpected: Sequence[str], finetune: bool) -> str:
    """One message listing what differs, with a hint for the usual causes."""
    lines = [f'{source} does not fit the model:']
    if mismatched:
        lines.append(f'  shape mismatch ({len(mismatched)} keys):')
        lines += [f'    {k}: checkpoint {list(state_dict[k].shape)} vs model {list(model_state[k].shape)}'
                  for k in mismatched[:_MAX_LISTED]]
        if len(mismatched) > _MAX_LISTED:
            lines.append(f'    ... and {len(mismatched) - _MAX_LISTED} more')
    if missing:
        lines.append(f'  missing in checkpoint ({len(missing)} keys): {_preview(missing)}')
    if unexpected:
        lines.append(f'  unexpected in checkpoint ({len(unexpected)} keys): {_preview(unexpected)}')
    if 'head.weight' in mismatched and not finetune:
        lines.append('  hint: the classifier has another class count; pass finetune=True to drop it')
    if any(key.startswith('out_norms.') for key in unexpected):
        lines.append('  hint: the checkpoint has per-stage output norms; '
                     'create the model with out_norms=True')
    return '\n'.join(lines)


def _preview(keys: Sequence[Any]) -> str:
    """The first few items of a long list, for messages."""
    shown = ', '.join(str(key) for key in keys[:_MAX_LISTED])
    return shown + (f', ... ({len(keys) - _MAX_LISTED} more)' if len(keys) > _MAX_LISTED else '')


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` that replaces ``path`` only once the new file is completely on disk.

    An interrupted or failing save leaves the previous file untouched and no temporary file.
    """
    write_atomic(Path(path), lambda f: torch.save(obj, f))


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors (contiguous CPU tensors), atomically like ``save_atomic``."""
    from safetensors.torch import save  # imported here: only needed for this format

    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f'safetensors holds tensors only; not tensors: {_preview(not_tensors)}')
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    data = save(tensors, metadata={'format': 'pt', **(metadata or {})})
    write_atomic(Path(path), lambda f: f.write(data))


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f'cannot save {path}: directory {path.parent} does not exist')
    # Same directory, so os.replace is a rename within one file system and hence atomic.
    tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        with open(tmp, 'xb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the partial file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if os.name == 'posix':
        # Persist the rename itself; without this a power loss can still revert to the old file.
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------
# Conversion and command line
# ----------------------------------------------------------------------------------------------

def convert_checkpoint(src: PathLike, dst: PathLike, to: str, fmt: Optional[str] = None,
                       prefer_ema: bool = False) -> StateDict:
    """Read any supported checkpoint and write its weights in the official or mmsegmentation layout.

    Args:
        src: input checkpoint.
        dst: output file.
        to: 'official' (the .pth holds {'model': ...}, as the official code reads it) or 'mmseg'
            (backbone keys, the .pth holds {'state_dict': ...}; head and final norm are dropped).
        fmt: 'pth' or 'safetensors'; by default from the suffix of ``dst``.
        prefer_ema: convert the EMA weights.

    Returns:
        The state dict that was written.
    """
    if to not in ('official', 'mmseg'):
        raise ValueError(f"to must be 'official' or 'mmseg', got {to!r}")
    dst = Path(dst)
    fmt = fmt or ('safetensors' if dst.suffix == '.safetensors' else 'pth')
    if fmt not in ('pth', 'safetensors'):
        raise ValueError(f"format must be 'pth' or 'safetensors', got {fmt!r}")
    if (dst.suffix == '.safetensors') != (fmt == 'safetensors'):
        raise ValueError(f'{dst}: the suffix does not match format {fmt}; name safetensors files '
                         '*.safetensors and nothing else, as readers pick the format by suffix')
    state_dict = extract_state_dict(torch_load(src), prefer_ema=prefer_ema, source=str(src))
    if to == 'mmseg':
        state_dict = official_to_mmseg(state_dict)
    if fmt == 'safetensors':
        save_safetensors(state_dict, dst)
    else:
        save_atomic({'model' if to == 'official' else 'state_dict': state_dict}, dst)
    return state_dict


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m twins.checkpoint convert IN OUT --to {official,mmseg} [--format ...]``."""
    parser = argparse.ArgumentParser(prog='python -m twins.checkpoint', description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    convert = commands.add_parser('convert', help='convert a checkpoint between key layouts and formats')
    convert.add_argument('input', help='official, timm, DDP or mmsegmentation checkpoint '
                                       '(.pth or .safetensors)')
    convert.add_argument('output', help='file to write')
    convert.add_argument('--to', required=True, choices=('official', 'mmseg'), help='key layout to write')
    convert.add_argument('--format', choices=('pth', 'safetensors'), default=None,
                         help='output format (default: from the output suffix)')
    convert.add_argument('--prefer-ema', action=argparse.BooleanOptionalAction, default=False,
                         help='convert the EMA weights of a training checkpoint')
    args = parser.parse_args(argv)
    try:
        state_dict = convert_checkpoint(args.input, args.output, to=args.to, fmt=args.format,
                                        prefer_ema=args.prefer_ema)
    except (OSError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    count = sum(value.numel() for value in state_dict.values())
    print(f'wrote {len(state_dict)} tensors ({count:,} values, {args.to} layout) to {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
