"""Tests for utils.py: RNG state round trip, metric smoothing, single-process helpers, saving."""
import random

import numpy as np
import pytest
import torch

import utils


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.normal()


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    utils.seed_everything(5)
    np.random.normal()  # leave a cached gaussian in numpy's state
    state = utils.capture_rng_state()
    expected = draws()
    torch.save({'rng': state}, tmp_path / 'rng.pth')
    utils.seed_everything(99)
    utils.restore_rng_state(torch.load(tmp_path / 'rng.pth', weights_only=True)['rng'])
    assert draws() == expected


def test_seed_everything_makes_draws_repeatable():
    utils.seed_everything(1)
    first = draws()
    utils.seed_everything(1)
    assert draws() == first
    utils.seed_everything(2)
    assert draws() != first


def test_smoothed_value_window_and_global_average():
    value = utils.SmoothedValue(window_size=3)
    for x in (1.0, 2.0, 3.0, 10.0):
        value.update(x)
    value.update(4.0, n=3)
    assert value.median == 4.0  # window: 3, 10, 4
    assert value.avg == pytest.approx(17 / 3)
    assert value.global_avg == pytest.approx((1 + 2 + 3 + 10 + 12) / 7)
    assert value.value == 4.0


def test_single_process_helpers():
    assert utils.init_distributed_mode('cpu') == utils.DistEnv(False, 0, 1, 0)
    assert utils.get_world_size() == 1 and utils.is_main_process()
    assert utils.all_reduce_sum([1.5, 2.0], 'cpu') == [1.5, 2.0]
    assert len(utils.gather_rng_states()) == 1


def test_save_on_master_writes_atomically(tmp_path):
    path = tmp_path / 'ckpt.pth'
    utils.save_on_master({'w': torch.arange(3)}, path)
    utils.save_on_master({'w': torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)['w'], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pth']  # no temporary file left


def test_log_every_prints_eta_rate_and_memory(capsys):
    logger = utils.MetricLogger()
    seen = []
    for i in logger.log_every(range(5), print_freq=2, header='Epoch: [3]', device=torch.device('cpu'),
                              batch_size=8):
        logger.update(loss=float(i * i))
        seen.append(i)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('Epoch: [3] [')]
    assert seen == [0, 1, 2, 3, 4]
    assert [line.split(']')[1].strip(' [') for line in lines] == ['0/5', '2/5', '4/5']
    assert all('eta: ' in line and 'img/s: ' in line and 'max mem: ' in line for line in lines)
    assert 'loss: 4.0000 (6.0000)' in lines[-1]  # median, then mean of 0, 1, 4, 9, 16


def test_fused_optimizer_kwargs_where_the_kernel_exists():
    cpu = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    assert utils.fused_optimizer_kwargs('adamw', cpu) == {'fused': True}
    assert utils.fused_optimizer_kwargs('AdamW', iter(cpu)) == {'fused': True}  # a generator, as model.parameters()
    assert utils.fused_optimizer_kwargs('adam', cpu) == {'fused': True}
    assert utils.fused_optimizer_kwargs('sgd', cpu) == {}  # timm's own implementations take no `fused`
    assert utils.fused_optimizer_kwargs('lamb', cpu) == {}
    assert utils.fused_optimizer_kwargs('adamw', []) == {}
    meta = [torch.zeros(3, device='meta')]  # a device without the kernel, alone or mixed in
    assert utils.fused_optimizer_kwargs('adamw', meta) == {}
    assert utils.fused_optimizer_kwargs('adamw', cpu + meta) == {}


def test_optimizer_step_tool_times_every_implementation():
    import subprocess
    import sys
    from pathlib import Path

    from twins import create_model
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / 'tools' / 'optimizer_step.py'), '--model', 'alt_gvt_micro',
                          '--runs', '2', '--rounds', '1'], check=True, text=True, capture_output=True).stdout
    count = sum(p.numel() for p in create_model('alt_gvt_micro').parameters())
    assert f"alt_gvt_micro's {count:,} parameters on cpu" in out
    timed = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[1:]}
    assert set(timed) == {'loop', 'foreach', 'fused'} and all(ms > 0 for ms in timed.values())
