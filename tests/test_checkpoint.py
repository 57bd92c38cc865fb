"""Tests for twins.checkpoint: every supported format loads exactly, unsafe or foreign files are
refused with a clear error, and the mmsegmentation conversion matches the reference key lists."""
import argparse
import functools
import os
import pickle
import random
import shlex
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from conftest import load_reference
from twins import create_model
from twins.checkpoint import (CheckpointMismatchError, LoadReport, UnsafeCheckpointError,
                              extract_state_dict, load_pretrained, main, mmseg_to_official,
                              official_to_mmseg, save_atomic, save_safetensors, torch_load)

# official model name -> the backbone name in mmsegmentation's config names
MMSEG_NAMES = {'pcpvt_small_v0': 'pcpvt-s', 'pcpvt_base_v0': 'pcpvt-b', 'pcpvt_large_v0': 'pcpvt-l',
               'alt_gvt_small': 'svt-s', 'alt_gvt_base': 'svt-b', 'alt_gvt_large': 'svt-l'}
MICRO = ['alt_gvt_micro', 'pcpvt_micro']
HEAD_AND_NORM = ['norm.weight', 'norm.bias', 'head.weight', 'head.bias']


@pytest.fixture(scope='module', autouse=True)
def _single_thread():
    """Micro models on tiny inputs: extra threads cost more than they save, most on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(name: str, seed: int, **overrides) -> torch.nn.Module:
    """A model in eval mode whose random initialisation depends on `seed`."""
    torch.manual_seed(seed)
    return create_model(name, **overrides).eval()


@functools.lru_cache(maxsize=None)
def _source(name: str, **overrides) -> torch.nn.Module:
    """The model whose weights a test saves (seed 0), built once; tests only read it."""
    return _model(name, 0, **overrides)


def _images() -> torch.Tensor:
    # The smallest input the micro models take (total stride 32): keeps the forward passes cheap.
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _assert_same_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], skip=()) -> None:
    keys_a = [k for k in a if not k.startswith(tuple(skip))]
    assert keys_a == [k for k in b if not k.startswith(tuple(skip))]
    assert all(torch.equal(a[k], b[k]) for k in keys_a)


def _shapes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


@pytest.fixture(scope='module')
def reference() -> Tuple[dict, dict]:
    return load_reference('official_state_dict_keys'), load_reference('mmseg_segmentor_keys')


def _meta_state_dict(pairs: List[Tuple[str, List[int]]], strip: str = '') -> Dict[str, torch.Tensor]:
    """Shape-only tensors (meta device: no memory) for a reference key list."""
    return {key[len(strip):]: torch.empty(shape, device='meta')
            for key, shape in pairs if key.startswith(strip)}


# ---------------------------------------------------------------------------------------------
# Every classification format loads exactly
# ---------------------------------------------------------------------------------------------

def _write_official(sd, path, name):
    args = argparse.Namespace(model=name, lr=5e-4, batch_size=128, input_size=224, drop_path=0.1)
    save_atomic({'model': sd, 'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3}]},
                 'epoch': 299, 'args': args}, path)


WRITERS: Dict[str, Callable] = {
    'official': _write_official,
    'official_legacy_format': lambda sd, path, name: torch.save(
        {'model': sd, 'args': argparse.Namespace(model=name)}, path, _use_new_zipfile_serialization=False),
    'bare': lambda sd, path, name: torch.save(sd, path),
    'ddp': lambda sd, path, name: torch.save({'model': {f'module.{k}': v for k, v in sd.items()}}, path),
    'timm': lambda sd, path, name: torch.save({'epoch': 3, 'arch': name, 'state_dict': sd}, path),
    'timm_ema': lambda sd, path, name: torch.save({'state_dict_ema': sd}, path),
    'safetensors': lambda sd, path, name: save_safetensors(sd, path),
}


@pytest.mark.parametrize('fmt', list(WRITERS))
@pytest.mark.parametrize('name', MICRO)
def test_every_format_loads_exactly(tmp_path, name, fmt):
    source, target = _source(name), _model(name, seed=1)
    assert not torch.equal(source.head.weight, target.head.weight)  # else the test proves nothing
    path = tmp_path / ('ckpt.safetensors' if fmt == 'safetensors' else 'ckpt.pth')
    WRITERS[fmt](source.state_dict(), path, name)

    report = load_pretrained(target, path)

    assert report == LoadReport()
    # Identical parameters and buffers imply identical outputs; the forward check is done once,
    # for the conversion with the most arithmetic (mmsegmentation), below.
    _assert_same_weights(source.state_dict(), target.state_dict())


def test_official_checkpoint_keeps_args_namespace(tmp_path):
    source = _source('pcpvt_micro')
    _write_official(source.state_dict(), tmp_path / 'ckpt.pth', 'pcpvt_micro')
    loaded = torch_load(tmp_path / 'ckpt.pth')
    assert isinstance(loaded['args'], argparse.Namespace) and loaded['args'].model == 'pcpvt_micro'
    assert loaded['epoch'] == 299


def test_prefer_ema_picks_the_ema_weights(tmp_path):
    live, ema = _source('pcpvt_micro'), _model('pcpvt_micro', seed=2)
    torch.save({'model': live.state_dict(), 'model_ema': ema.state_dict()}, tmp_path / 'ckpt.pth')

    target = _model('pcpvt_micro', seed=1)
    load_pretrained(target, tmp_path / 'ckpt.pth', prefer_ema=True)
    _assert_same_weights(ema.state_dict(), target.state_dict())
    load_pretrained(target, tmp_path / 'ckpt.pth')
    _assert_same_weights(live.state_dict(), target.state_dict())


def test_prefer_ema_without_ema_weights_is_an_error(tmp_path):
    torch.save({'model': _source('pcpvt_micro').state_dict()}, tmp_path / 'ckpt.pth')
    with pytest.raises(ValueError, match=r"no EMA weights.*top-level keys: model"):
        load_pretrained(_model('pcpvt_micro', seed=1), tmp_path / 'ckpt.pth', prefer_ema=True)


@pytest.mark.parametrize('obj, match', [
    ([torch.zeros(1)], 'got list'),
    ({'epoch': 3, 'arch': 'x'}, r'epoch, arch are not tensors'),
    ({'model': {}}, "under 'model' is empty"),
])
def test_extract_state_dict_rejects_non_state_dicts(obj, match):
    with pytest.raises(ValueError, match=match):
        extract_state_dict(obj, source='ckpt.pth')


# ---------------------------------------------------------------------------------------------
# mmsegmentation backbones and segmentors
# ---------------------------------------------------------------------------------------------

def _segmentor_checkpoint(backbone: Dict[str, torch.Tensor]) -> dict:
    """An mmsegmentation-style segmentor checkpoint around converted backbone weights."""
    heads = {'decode_head.conv_seg.weight': torch.randn(150, 128, 1, 1),
             'decode_head.conv_seg.bias': torch.randn(150),
             'auxiliary_head.convs.0.conv.weight': torch.randn(256, 96, 3, 3),
             'neck.lateral_convs.0.conv.weight': torch.randn(256, 32, 1, 1)}
    state_dict = {f'backbone.{k}': v for k, v in backbone.items()} | heads
    return {'meta': {'epoch': 16, 'iter': 160000}, 'state_dict': state_dict}


@pytest.mark.parametrize('container', ['backbone_only', 'segmentor'])
@pytest.mark.parametrize('name', MICRO)
def test_mmseg_checkpoints_load_exactly(tmp_path, capsys, name, container):
    out_norms = name.startswith('alt_gvt')  # mmsegmentation's SVT configs have norm_list, PCPVT not
    source, target = _source(name, out_norms=out_norms), _model(name, 1, out_norms=out_norms)
    backbone = official_to_mmseg(source.state_dict())
    obj = backbone if container == 'backbone_only' else _segmentor_checkpoint(backbone)
    torch.save(obj, tmp_path / 'seg.pth')

    report = load_pretrained(target, tmp_path / 'seg.pth')

    assert report.missing == HEAD_AND_NORM and report.unexpected == [] and report.dropped_head == []
    assert 'no weights for norm.weight, norm.bias, head.weight, head.bias' in capsys.readouterr().out
    _assert_same_weights(source.state_dict(), target.state_dict(), skip=('norm.', 'head.'))
    x = _images()
    with torch.no_grad():
        for expected, got in zip(source.forward_pyramid(x), target.forward_pyramid(x), strict=True):
            assert torch.equal(expected, got)


def test_svt_segmentor_into_model_without_out_norms_names_the_fix():
    backbone = official_to_mmseg(_source('alt_gvt_micro', out_norms=True).state_dict())
    with pytest.raises(CheckpointMismatchError,
                       match=r'(?s)unexpected.*out_norms\.0\.weight.*out_norms=True'):
        load_pretrained(_model('alt_gvt_micro', 1), _segmentor_checkpoint(backbone))


def test_gsa_in_proj_is_q_then_kv():
    sd = _source('alt_gvt_micro').state_dict()
    mm = official_to_mmseg(sd)
    # Block 1 of stage 0 is GSA, block 0 is LSA (SVT alternates, LSA first).
    expected = torch.cat([sd['blocks.0.1.attn.q.weight'], sd['blocks.0.1.attn.kv.weight']])
    assert torch.equal(mm['layers.0.1.attn.attn.in_proj_weight'], expected)
    assert torch.equal(mm['layers.0.1.attn.attn.out_proj.bias'], sd['blocks.0.1.attn.proj.bias'])
    assert torch.equal(mm['layers.0.0.attn.qkv.weight'], sd['blocks.0.0.attn.qkv.weight'])
    assert torch.equal(mm['layers.0.0.attn.proj.weight'], sd['blocks.0.0.attn.proj.weight'])
    assert torch.equal(mm['layers.0.1.ffn.layers.0.0.weight'], sd['blocks.0.1.mlp.fc1.weight'])
    assert torch.equal(mm['layers.0.1.ffn.layers.1.bias'], sd['blocks.0.1.mlp.fc2.bias'])
    assert torch.equal(mm['position_encodings.2.proj.weight'], sd['pos_block.2.proj.0.weight'])
    assert not any(key.startswith(('head.', 'norm.')) for key in mm)


@pytest.mark.parametrize('name', MICRO)
def test_official_mmseg_official_is_identity_on_values(name):
    sd = _source(name, out_norms=True).state_dict()
    back = mmseg_to_official(official_to_mmseg(sd))
    backbone = {k: v for k, v in sd.items() if not k.startswith(('head.', 'norm.'))}
    assert _shapes(back) == _shapes(backbone)
    assert all(torch.equal(back[k], backbone[k]) for k in backbone)


@pytest.mark.parametrize('official_name', list(MMSEG_NAMES))
def test_conversion_matches_reference_key_lists(reference, official_name):
    official_keys, mmseg_keys = reference
    official = _meta_state_dict(official_keys[official_name]['state_dict'])
    segmentors = [v for k, v in mmseg_keys.items() if k.startswith(f'twins_{MMSEG_NAMES[official_name]}_')]
    assert len(segmentors) == 2  # Semantic FPN and UPerNet

    for segmentor in segmentors:
        mmseg = _shapes(_meta_state_dict(segmentor['state_dict'], strip='backbone.'))
        has_norm_list = any(key.startswith('norm_list.') for key in mmseg)
        assert has_norm_list == official_name.startswith('alt_gvt')  # FACTS.md: SVT yes, PCPVT no
        # Official weights plus the per-stage output norms give exactly mmsegmentation's backbone.
        out_norms = {f'out_norms.{i}.{leaf}': torch.empty(official[f'patch_embeds.{i}.norm.weight'].shape,
                                                          device='meta')
                     for i in range(4) for leaf in ('weight', 'bias')} if has_norm_list else {}
        assert _shapes(official_to_mmseg(official | out_norms)) == mmseg
        assert _shapes(official_to_mmseg(official)) == {k: s for k, s in mmseg.items()
                                                        if not k.startswith('norm_list.')}
        # ...and back: the official backbone without head and final norm.
        expected = {k: s for k, s in _shapes(official | out_norms).items()
                    if not k.startswith(('head.', 'norm.'))}
        back = mmseg_to_official(_meta_state_dict(segmentor['state_dict'], strip='backbone.'))
        assert _shapes(back) == expected
        assert _shapes(official_to_mmseg(back)) == mmseg


def test_other_networks_are_not_mistaken_for_mmseg():
    # timm's Swin starts its keys with 'layers.', mmsegmentation's Swin has 'projection' and
    # 'ffn.layers.'; neither is a Twins backbone, so neither may be converted.
    for keys in (['layers.0.blocks.0.mlp.fc1.weight', 'head.fc.weight'],
                 ['patch_embed.projection.weight', 'stages.0.blocks.0.ffn.layers.0.0.weight']):
        state_dict = {key: torch.zeros(2) for key in keys}
        assert list(extract_state_dict(state_dict)) == keys


def test_unknown_keys_are_not_passed_through():
    with pytest.raises(ValueError, match=r"'blocks.0.0.attn.rel_pos.weight' is not a key of the official"):
        official_to_mmseg({'blocks.0.0.attn.rel_pos.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match=r'in_proj must hold q, k and v'):
        mmseg_to_official({'layers.0.0.attn.attn.in_proj_weight': torch.zeros(4, 2)})


# ---------------------------------------------------------------------------------------------
# Fine-tuning and mismatches
# ---------------------------------------------------------------------------------------------

def test_finetune_drops_a_classifier_of_another_class_count(tmp_path, capsys):
    source = _source('alt_gvt_micro')
    torch.save({'model': source.state_dict()}, tmp_path / 'ckpt.pth')
    target = _model('alt_gvt_micro', 1, num_classes=10)
    new_head = target.head.weight.clone()

    report = load_pretrained(target, tmp_path / 'ckpt.pth', finetune=True)

    assert report.dropped_head == report.missing == ['head.weight', 'head.bias']
    printed = capsys.readouterr().out
    assert ('dropping classifier head.weight [1000, 128] -> model has [10, 128]: fine-tuning to 10 classes'
            in printed)
    assert len(printed.splitlines()) == 1  # one note, not a second one about the missing head
    _assert_same_weights(source.state_dict(), target.state_dict(), skip=('head.',))
    assert torch.equal(target.head.weight, new_head)


def test_finetune_keeps_a_classifier_that_fits(tmp_path):
    source = _source('pcpvt_micro')
    target = _model('pcpvt_micro', 1)
    report = load_pretrained(target, source.state_dict(), finetune=True)
    assert report.dropped_head == []
    assert torch.equal(target.head.weight, source.head.weight)


def test_finetune_into_model_without_classifier(capsys):
    source = _source('pcpvt_micro')
    target = _model('pcpvt_micro', 1, num_classes=0)
    report = load_pretrained(target, source.state_dict(), finetune=True)
    assert report.dropped_head == ['head.weight', 'head.bias'] and report.missing == []
    assert 'model has no classifier (num_classes=0)' in capsys.readouterr().out
    _assert_same_weights(source.state_dict(), target.state_dict(), skip=('head.',))
    with pytest.raises(CheckpointMismatchError,
                       match=r'unexpected in checkpoint \(2 keys\): head.weight, head.bias'):
        load_pretrained(target, source.state_dict())


def test_other_class_count_without_finetune_is_an_error(tmp_path):
    torch.save(_source('alt_gvt_micro').state_dict(), tmp_path / 'ckpt.pth')
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(_model('alt_gvt_micro', 1, num_classes=10), tmp_path / 'ckpt.pth')
    message = str(info.value)
    assert str(tmp_path / 'ckpt.pth') in message
    assert 'head.weight: checkpoint [1000, 128] vs model [10, 128]' in message
    assert 'head.bias: checkpoint [1000] vs model [10]' in message
    assert 'finetune=True' in message


def test_checkpoint_of_another_model_lists_the_keys(tmp_path):
    torch.save({'model': _source('alt_gvt_micro').state_dict()}, tmp_path / 'svt.pth')
    target = _model('pcpvt_micro', 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(target, tmp_path / 'svt.pth')
    message = str(info.value)
    assert f'{tmp_path / "svt.pth"} does not fit the model' in message
    assert 'patch_embeds.0.proj.weight: checkpoint [32, 3, 4, 4] vs model [16, 3, 4, 4]' in message
    assert sum(' vs model ' in line for line in message.splitlines()) == 10  # capped listing
    assert '... and ' in message
    assert 'blocks.0.0.attn.qkv.weight' in message  # LSA keys a PCPVT model does not have
    _assert_same_weights(before, target.state_dict())  # nothing was loaded


class _ShapeOnlyModel(torch.nn.Module):
    """Stands in for a full-size model without allocating it: load_pretrained checks every key and
    shape against ``state_dict()`` before it loads anything."""

    def __init__(self, state_dict: Dict[str, torch.Tensor]):
        super().__init__()
        self._reference = state_dict

    def state_dict(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        return self._reference


def test_loaded_checkpoint_errors_name_the_given_source():
    checkpoint = {'model': _source('alt_gvt_micro').state_dict()}
    with pytest.raises(CheckpointMismatchError, match=r'^runs/svt/checkpoint.pth does not fit the model'):
        load_pretrained(_model('pcpvt_micro', 1), checkpoint, source='runs/svt/checkpoint.pth')


def test_full_size_checkpoint_of_another_model(reference):
    # alt_gvt_small weights into pcpvt_small_v0, all as shape-only tensors.
    official_keys, _ = reference
    svt_small = _meta_state_dict(official_keys['alt_gvt_small']['state_dict'])
    model = _ShapeOnlyModel(_meta_state_dict(official_keys['pcpvt_small_v0']['state_dict']))
    with pytest.raises(CheckpointMismatchError, match=r'(?s)shape mismatch.*'
                       r'missing in checkpoint.*blocks\.0\.2\.norm1\.weight.*unexpected in checkpoint'):
        load_pretrained(model, {'model': svt_small})


def test_strict_false_reports_extra_keys_but_not_wrong_shapes():
    source = _source('pcpvt_micro')
    extra = source.state_dict() | {'extra.weight': torch.zeros(3)}
    with pytest.raises(CheckpointMismatchError, match=r'unexpected in checkpoint \(1 keys\): extra.weight'):
        load_pretrained(_model('pcpvt_micro', 1), extra)
    target = _model('pcpvt_micro', 1)
    assert load_pretrained(target, extra, strict=False) == LoadReport(unexpected=['extra.weight'])
    _assert_same_weights(source.state_dict(), target.state_dict())
    wrong = source.state_dict() | {'norm.weight': torch.zeros(5)}
    with pytest.raises(CheckpointMismatchError, match=r'norm.weight: checkpoint \[5\] vs model \[64\]'):
        load_pretrained(target, wrong, strict=False)


# ---------------------------------------------------------------------------------------------
# Unsafe, missing and foreign files
# ---------------------------------------------------------------------------------------------

class _ShellPayload:
    """Unpickling this object runs a shell command (here: creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(str(self.marker))}',)


MALICIOUS_WRITERS: Dict[str, Callable] = {
    'plain_pickle': lambda obj, path: path.write_bytes(pickle.dumps(obj)),
    'pickle_protocol_0': lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=0)),
    'torch_save': lambda obj, path: torch.save(obj, path),
    'torch_save_legacy': lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
}


def test_the_malicious_payload_is_live(tmp_path):
    # Control: plain pickle does run it, so the refusal tests below are meaningful.
    pickle.loads(pickle.dumps(_ShellPayload(tmp_path / 'ran')))
    assert (tmp_path / 'ran').exists()


@pytest.mark.parametrize('writer', list(MALICIOUS_WRITERS))
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker, path = tmp_path / 'pwned', tmp_path / 'evil.pth'
    MALICIOUS_WRITERS[writer]({'model': {'w': torch.zeros(1)}, 'x': _ShellPayload(marker)}, path)

    with pytest.raises(UnsafeCheckpointError, match=r'unpickling it needs the global \w+\.system') as info:
        torch_load(path)
    assert str(path) in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(_model('pcpvt_micro', 1), path)
    assert not marker.exists()


def test_whole_pickled_module_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / 'module.pth')
    with pytest.raises(UnsafeCheckpointError, match=r'torch\.nn\.modules\.linear\.Linear'):
        torch_load(tmp_path / 'module.pth')


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing-here.pth'):
        torch_load(tmp_path / 'nothing-here.pth')
    with pytest.raises(FileNotFoundError, match='nothing-here.pth'):
        load_pretrained(_model('pcpvt_micro', 1), tmp_path / 'nothing-here.pth')


@pytest.mark.parametrize('filename, content', [
    ('random.pth', random.Random(0).randbytes(4096)),
    ('notes.pth', b'epoch 10: top-1 81.2\nthis is a log, not a checkpoint\n'),
    ('empty.pth', b''),
    ('broken.safetensors', random.Random(1).randbytes(256)),
])
def test_garbage_file_is_a_clear_value_error(tmp_path, filename, content):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        torch_load(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError('cannot pickle this')


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'model': _source('pcpvt_micro').state_dict()}, path)
    previous = path.read_bytes()

    with pytest.raises(RuntimeError, match='cannot pickle this'):
        save_atomic({'model': _model('pcpvt_micro', 1).state_dict(), 'bad': _Unpicklable()}, path)

    assert path.read_bytes() == previous
    assert os.listdir(tmp_path) == ['checkpoint.pth']


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch, suffix):
    path = tmp_path / f'weights{suffix}'
    path.write_bytes(b'previous contents')

    def crash(fd):
        raise OSError('disk full')

    monkeypatch.setattr(os, 'fsync', crash)  # fails after the data was written, before the rename
    with pytest.raises(OSError, match='disk full'):
        if suffix == '.pth':
            save_atomic({'w': torch.ones(3)}, path)
        else:
            save_safetensors({'w': torch.ones(3)}, path)
    assert path.read_bytes() == b'previous contents'
    assert os.listdir(tmp_path) == [path.name]


def test_save_safetensors_writes_contiguous_copies(tmp_path):
    weight = torch.arange(12.).reshape(3, 4)
    save_safetensors({'w': weight.t(), 'row': weight[1]}, tmp_path / 'w.safetensors')
    loaded = torch_load(tmp_path / 'w.safetensors')
    assert torch.equal(loaded['w'], weight.t()) and torch.equal(loaded['row'], weight[1])
    with pytest.raises(ValueError, match='not tensors: epoch'):
        save_safetensors({'epoch': 3}, tmp_path / 'x.safetensors')


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def test_cli_converts_to_mmseg_and_back(tmp_path, capsys):
    source = _source('alt_gvt_micro')
    _write_official(source.state_dict(), tmp_path / 'official.pth', 'alt_gvt_micro')

    assert main(['convert', str(tmp_path / 'official.pth'), str(tmp_path / 'mmseg.pth'),
                 '--to', 'mmseg']) == 0
    converted = torch_load(tmp_path / 'mmseg.pth')['state_dict']
    assert 'layers.3.1.attn.attn.in_proj_weight' in converted and 'head.weight' not in converted
    assert main(['convert', str(tmp_path / 'mmseg.pth'), str(tmp_path / 'back.safetensors'),
                 '--to', 'official']) == 0
    assert 'wrote' in capsys.readouterr().out

    target = _model('alt_gvt_micro', 1)
    report = load_pretrained(target, tmp_path / 'back.safetensors')
    assert report.missing == HEAD_AND_NORM
    _assert_same_weights(source.state_dict(), target.state_dict(), skip=('head.', 'norm.'))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(['convert', str(tmp_path / 'missing.pth'), str(tmp_path / 'out.pth'), '--to', 'mmseg']) == 1
    assert 'missing.pth' in capsys.readouterr().err
    torch.save({'w': torch.zeros(1)}, tmp_path / 'in.pth')
    assert main(['convert', str(tmp_path / 'in.pth'), str(tmp_path / 'out.safetensors'),
                 '--to', 'official', '--format', 'pth']) == 1
    assert 'does not match format pth' in capsys.readouterr().err
