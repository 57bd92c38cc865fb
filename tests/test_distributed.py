"""A real two-process torchrun job on the CPU (gloo): training and exact --dist-eval."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import main
from test_main import make_image_folder, tiny_flags

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_dist_eval_equals_single_process_eval(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data')  # 25 validation images: 13 + 12 over two ranks
    output_dir = tmp_path / 'out'
    flags = tiny_flags(data, output_dir, '--epochs', '1', '--batch-size', '4', '--dist-eval')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29531',
         'main.py', *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    # 24 images / (4 per process x 2 processes) = 3 steps; printed once (rank 0 only).
    assert 'global batch 8 = 4 x 2 processes' in result.stdout
    assert result.stdout.count('Accuracy of the network on the 25 test images') == 1

    distributed = json.loads((output_dir / 'log.txt').read_text())
    single = main.main(main.parse_args(tiny_flags(data, None, '--eval', '--resume', str(output_dir / 'checkpoint.pth'))))
    assert single['num_images'] == 25
    assert distributed['test_acc1'] == pytest.approx(single['acc1'], abs=1e-9)
    assert distributed['test_acc5'] == pytest.approx(single['acc5'], abs=1e-9)
    assert distributed['test_loss'] == pytest.approx(single['loss'], rel=1e-5)
    printed = re.search(r'\* Acc@1 ([\d.]+)', result.stdout).group(1)
    assert printed == f"{single['acc1']:.3f}"
