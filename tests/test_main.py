"""Tests for main.py: flags and configs, training, checkpoints, resume, evaluation, bad input.

Runs use a tiny Twins-SVT on a 3-class 32x32 ImageFolder (24 training, 25 validation images).
The helpers at the top are shared with the other tests/test_*.py files of the training code.
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import engine
import main
from twins import create_model, list_models
from twins.checkpoint import CheckpointMismatchError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ('circle', 'square', 'stripe')
VAL_COUNTS = (9, 8, 8)  # 25 in all: odd, so padded sharding would change distributed accuracy


def write_class_image(path, label, rng):
    """32x32 RGB image whose dominant colour channel is the class; noise makes each one differ."""
    pixels = rng.integers(0, 90, size=(32, 32, 3), dtype=np.uint8)
    pixels[..., label] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_image_folder(root, train_per_class=8, val_counts=VAL_COUNTS):
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        for i in range(train_per_class):
            write_class_image(root / 'train' / name / f'{i}.png', label, rng)
        for i in range(val_counts[label]):
            write_class_image(root / 'val' / name / f'{i}.png', label, rng)
    return root


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


def tiny_flags(data_path, output_dir=None, *extra):
    """Flags for a fast CPU run; mixup, drop path and erasing stay on so RNG state matters."""
    flags = ['--model', 'alt_gvt_micro', '--data-set', 'IMAGEFOLDER', '--data-path', str(data_path),
             '--input-size', '32', '--batch-size', '8', '--num-workers', '0', '--no-pin-mem',
             '--device', 'cpu', '--epochs', '2', '--warmup-epochs', '1', '--lr', '0.1',
             '--drop-path', '0.1', '--print-freq', '100', '--seed', '3']
    if output_dir is not None:
        flags += ['--output-dir', str(output_dir)]
    return flags + list(extra)


def run(*flags):
    return main.main(main.parse_args(list(flags)))


def load_checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# ----------------------------------------------------------------------------- flags and configs
OFFICIAL_TRAIN = ('--model alt_gvt_base --batch-size 128 --data-path path_to_imagenet --dist-eval '
                  '--drop-path 0.3').split()
OFFICIAL_EVAL = '--eval --resume alt_gvt_large.pth --model alt_gvt_large --data-path path_to_imagenet'.split()


def test_defaults_are_the_official_ones():
    args = main.parse_args([])
    expected = dict(batch_size=64, epochs=300, model='pcpvt_small_v0', input_size=224, drop=0.0, drop_path=0.1,
                    opt='adamw', opt_eps=1e-8, clip_grad=None, momentum=0.9, weight_decay=0.05, sched='cosine',
                    lr=5e-4, warmup_lr=1e-6, min_lr=1e-5, decay_epochs=30, warmup_epochs=5, cooldown_epochs=10,
                    patience_epochs=10, decay_rate=0.1, color_jitter=0.4, aa='rand-m9-mstd0.5-inc1', smoothing=0.1,
                    train_interpolation='bicubic', repeated_aug=True, reprob=0.25, remode='pixel', recount=1,
                    mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch',
                    data_set='IMNET', inat_category='name', seed=0, num_workers=10, pin_mem=True, world_size=1,
                    dist_url='env://', model_ema_decay=0.99996, model_ema=False, eval=False, dist_eval=False)
    assert {key: getattr(args, key) for key in expected} == expected
    assert args.device == ('cuda' if torch.cuda.is_available() else 'cpu')


def test_official_command_lines_parse_verbatim():
    train = main.parse_args(OFFICIAL_TRAIN + ['--local_rank=3'])
    assert (train.model, train.batch_size, train.dist_eval, train.drop_path, train.local_rank) == \
        ('alt_gvt_base', 128, True, 0.3, 3)
    evaluation = main.parse_args(OFFICIAL_EVAL)
    assert (evaluation.eval, evaluation.resume, evaluation.model) == (True, 'alt_gvt_large.pth', 'alt_gvt_large')
    spellings = main.parse_args(['--throughout', '--no-repeated-aug', '--no-pin-mem', '--output_dir', 'o',
                                 '--start_epoch', '4', '--num_workers', '2', '--world_size', '8',
                                 '--dist_url', 'tcp://h:1', '--local-rank', '1', '--resplit'])
    assert (spellings.throughput, spellings.repeated_aug, spellings.pin_mem, spellings.output_dir,
            spellings.start_epoch, spellings.num_workers, spellings.world_size, spellings.dist_url,
            spellings.local_rank, spellings.resplit) == (True, False, False, 'o', 4, 2, 8, 'tcp://h:1', 1, True)


def test_config_sets_defaults_and_command_line_wins(tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text('lr: 5e-4\ndrop_path: 0.3\nmixup: 0.0\nopt_betas: [0.9, 0.95]\nmodel: alt_gvt_base\n')
    args = main.parse_args(['--config', str(config), '--drop-path', '0.2'])
    # '5e-4' is a YAML string; it must come out as the float the flag would give.
    assert (args.lr, args.drop_path, args.mixup, args.opt_betas, args.model) == \
        (5e-4, 0.2, 0.0, [0.9, 0.95], 'alt_gvt_base')


def test_unknown_config_key_names_key_and_close_match(tmp_path, capsys):
    config = tmp_path / 'c.yaml'
    config.write_text('drop_pth: 0.3\n')
    with pytest.raises(SystemExit):
        main.parse_args(['--config', str(config)])
    message = capsys.readouterr().err
    assert "unknown key 'drop_pth'" in message and 'drop_path' in message


def test_config_value_outside_choices_is_an_error(tmp_path, capsys):
    config = tmp_path / 'c.yaml'
    config.write_text('mixup_mode: row\n')
    with pytest.raises(SystemExit):
        main.parse_args(['--config', str(config)])
    assert 'mixup_mode must be one of' in capsys.readouterr().err


DROP_PATH = {'pcpvt_small_v0': 0.2, 'pcpvt_base_v0': 0.3, 'pcpvt_large_v0': 0.3,
             'alt_gvt_small': 0.2, 'alt_gvt_base': 0.3, 'alt_gvt_large': 0.3}


@pytest.mark.parametrize('model', sorted(DROP_PATH))
def test_model_configs_hold_the_paper_recipe(model):
    path = REPO / 'configs' / f'{model}.yaml'
    args = main.parse_args(['--config', str(path)])
    assert args.model == model and args.drop_path == DROP_PATH[model]
    # batch 128 x 8 GPUs = 1024 images at lr 5e-4 per 512 -> 1e-3, as the paper.
    assert args.batch_size * 8 * args.lr / main.BASE_BATCH == pytest.approx(1e-3)
    assert args.clip_grad == 5.0
    defaults = vars(main.parse_args([]))
    file_keys = yaml.safe_load(path.read_text())
    assert all(file_keys[key] != defaults[key] for key in file_keys), 'configs hold only differences'


def test_every_config_file_parses():
    for path in sorted((REPO / 'configs').glob('*.yaml')):
        args = main.parse_args(['--config', str(path)])
        assert args.model in list_models(include_aliases=True), path


# ----------------------------------------------------------------------------- bad input
def test_unwritable_output_dir_fails_before_data_is_read(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    # The data path does not exist either: the output directory must be checked first.
    with pytest.raises(PermissionError, match='cannot write to --output-dir .*a_file/out'):
        run(*tiny_flags(tmp_path / 'missing', blocker / 'out'))


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        run(*tiny_flags(tmp_path / 'nowhere'))


def test_unknown_model_lists_valid_names(image_folder):
    with pytest.raises(ValueError, match='unknown model .*alt_gvt_micro'):
        run(*tiny_flags(image_folder), '--model', 'alt_gvt_tiny')


def test_cuda_requested_without_cuda_is_an_error(image_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(RuntimeError, match='--device cpu'):
        run(*tiny_flags(image_folder), '--device', 'cuda')


def test_float16_amp_on_cpu_is_an_error(image_folder):
    with pytest.raises(ValueError, match='bfloat16'):
        run(*tiny_flags(image_folder), '--amp', '--amp-dtype', 'float16')


# ----------------------------------------------------------------------------- training run
@pytest.fixture(scope='module')
def trained(image_folder, tmp_path_factory):
    """Two epochs with EMA; shared by the tests that inspect the outputs of a run."""
    output_dir = tmp_path_factory.mktemp('run')
    run(*tiny_flags(image_folder, output_dir, '--model-ema', '--model-ema-decay', '0.5', '--model-ema-eval',
                    '--save-freq', '1'))
    return output_dir


def test_run_writes_official_log_lines(trained):
    lines = [json.loads(line) for line in (trained / 'log.txt').read_text().splitlines()]
    assert [line['epoch'] for line in lines] == [0, 1]
    official = {'train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters'}
    assert official <= set(lines[0])
    assert lines[0]['n_parameters'] == sum(p.numel() for p in create_model('alt_gvt_micro', num_classes=3).parameters())
    assert all(line['test_acc5'] == 100.0 for line in lines)  # top-5 of 3 classes is top-3
    assert 'test_ema_acc1' in lines[1]
    assert list(trained.glob('events.out.tfevents.*')), 'TensorBoard scalars are written'


def test_checkpoint_holds_everything_and_loads_weights_only(trained):
    checkpoint = load_checkpoint(trained / 'checkpoint.pth')
    assert {'model', 'optimizer', 'lr_scheduler', 'scaler', 'model_ema', 'epoch', 'max_accuracy', 'args',
            'rng_states'} <= set(checkpoint)
    assert checkpoint['epoch'] == 1
    assert checkpoint['args']['model'] == 'alt_gvt_micro' and checkpoint['args']['save_freq'] == 1
    log = [json.loads(line) for line in (trained / 'log.txt').read_text().splitlines()]
    assert checkpoint['max_accuracy'] == max(line['test_acc1'] for line in log)
    assert (trained / 'checkpoint_0.pth').is_file() and (trained / 'checkpoint_1.pth').is_file()
    best = load_checkpoint(trained / 'checkpoint_best.pth')
    assert log[best['epoch']]['test_acc1'] == checkpoint['max_accuracy']
    saved = yaml.safe_load((trained / 'config.yaml').read_text())
    assert saved == checkpoint['args']


def test_eval_prints_official_lines(trained, image_folder, capsys):
    capsys.readouterr()
    stats = run(*tiny_flags(image_folder), '--eval', '--resume', str(trained / 'checkpoint.pth'))
    out = capsys.readouterr().out
    assert re.search(r'^\* Acc@1 \d+\.\d{3} Acc@5 \d+\.\d{3} loss \d+\.\d{3}$', out, re.M)
    assert f"Accuracy of the network on the 25 test images: {stats['acc1']:.1f}%" in out
    last = json.loads((trained / 'log.txt').read_text().splitlines()[-1])
    assert stats['acc1'] == pytest.approx(last['test_acc1'])
    assert stats['loss'] == pytest.approx(last['test_loss'], rel=1e-5)


def test_eval_accepts_bare_state_dict_and_ema(trained, image_folder, tmp_path):
    checkpoint = load_checkpoint(trained / 'checkpoint.pth')
    torch.save(checkpoint['model'], tmp_path / 'bare.pth')
    bare = run(*tiny_flags(image_folder), '--eval', '--resume', str(tmp_path / 'bare.pth'))
    full = run(*tiny_flags(image_folder), '--eval', '--resume', str(trained / 'checkpoint.pth'))
    ema = run(*tiny_flags(image_folder), '--eval', '--model-ema-eval', '--resume', str(trained / 'checkpoint.pth'))
    assert bare == full
    last = json.loads((trained / 'log.txt').read_text().splitlines()[-1])
    assert ema['acc1'] == pytest.approx(last['test_ema_acc1'])
    assert ema['loss'] == pytest.approx(last['test_ema_loss'], rel=1e-5)
    assert ema['loss'] != full['loss']


def test_resume_missing_file_is_named(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match='no_such.pth'):
        run(*tiny_flags(image_folder), '--eval', '--resume', str(tmp_path / 'no_such.pth'))


def test_resume_other_models_checkpoint_lists_keys(trained, image_folder):
    with pytest.raises(CheckpointMismatchError) as error:
        run(*tiny_flags(image_folder, None, '--model', 'pcpvt_micro', '--resume', str(trained / 'checkpoint.pth')))
    message = str(error.value)
    assert str(trained / 'checkpoint.pth') in message
    assert 'blocks.0.0.attn.qkv.weight' in message  # an SVT (LSA) key that PCPVT lacks


def test_finetune_loads_backbone_and_replaces_head(image_folder, tmp_path):
    source = create_model('alt_gvt_micro', num_classes=7)
    torch.save({'model': source.state_dict()}, tmp_path / 'pretrained.pth')
    args = main.parse_args(tiny_flags(image_folder, None, '--finetune', str(tmp_path / 'pretrained.pth')))
    model, _ = main.build_model(args, num_classes=3, device=torch.device('cpu'))
    loaded, original = model.state_dict(), source.state_dict()
    assert all(torch.equal(loaded[key], original[key]) for key in original if not key.startswith('head.'))
    assert loaded['head.weight'].shape == (3, 128)


# ----------------------------------------------------------------------------- optimisation setup
def _trainer(image_folder, *extra):
    args = main.parse_args(tiny_flags(image_folder, None, *extra))
    dist_env = main.utils.DistEnv()
    data = main.build_data(args, dist_env, with_train=True)
    model, _ = main.build_model(args, data.num_classes, torch.device('cpu'))
    plan = main.plan_run(args, dist_env, data.num_classes, data.train_loader)
    trainer, scheduler = main.build_trainer(args, model, data, plan, torch.device('cpu'), None, dist_env)
    return args, data, plan, trainer, scheduler


def test_lr_is_scaled_by_global_batch_and_peg_norm_bias_skip_decay(image_folder):
    args, _, plan, trainer, _ = _trainer(image_folder, '--batch-size', '4', '--lr', '1e-3')
    assert plan.lr == pytest.approx(1e-3 * 4 / 512) and plan.steps_per_epoch == 24 // 4
    no_decay = {id(p) for group in trainer.optimizer.param_groups if group['weight_decay'] == 0
                for p in group['params']}
    model = trainer.model
    expected = {id(p) for name, p in model.named_parameters() if p.ndim == 1 or name.startswith('pos_block.')}
    assert no_decay == expected
    assert any(p.ndim == 4 for name, p in model.named_parameters() if name.startswith('pos_block.'))
    decayed = [g for g in trainer.optimizer.param_groups if g['weight_decay'] > 0]
    assert len(decayed) == 1 and decayed[0]['weight_decay'] == 0.05


def _adamw_steps(optimizer, params, grads):
    for grad in grads:
        for p, g in zip(params, grad):
            p.grad = g.clone()
        optimizer.step()


def test_adamw_is_fused_unless_turned_off_and_resumes_a_loop_optimizer_state(image_folder, tmp_path):
    """The fused AdamW is the default. Resumed from a checkpoint of the per-parameter loop
    (a --no-fused-opt run), it stays fused and continues as the loop itself would."""
    _, _, _, fused, fused_scheduler = _trainer(image_folder)
    args, _, _, loop, loop_scheduler = _trainer(image_folder, '--no-fused-opt')
    _, _, _, sgd, _ = _trainer(image_folder, '--opt', 'sgd')
    assert fused.optimizer.defaults['fused'] is True and type(fused.optimizer) is torch.optim.AdamW
    assert not loop.optimizer.defaults['fused'] and not sgd.optimizer.defaults.get('fused')
    params = [list(t.model.parameters()) for t in (loop, fused)]
    for group in loop.optimizer.param_groups:
        group['lr'] = 1e-3  # the scheduler's first (warm-up) lr is too small to tell states apart
    generator = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=generator) for p in params[0]] for _ in range(4)]
    _adamw_steps(loop.optimizer, params[0], grads[:2])
    torch.save({'model': loop.model.state_dict(), 'optimizer': loop.optimizer.state_dict(),
                'lr_scheduler': loop_scheduler.state_dict(), 'epoch': 0}, tmp_path / 'loop.pth')
    assert main.resume_training(args, fused, fused_scheduler, str(tmp_path / 'loop.pth'))[0] == 1
    assert all(group['fused'] is True for group in fused.optimizer.param_groups)
    _adamw_steps(loop.optimizer, params[0], grads[2:])
    _adamw_steps(fused.optimizer, params[1], grads[2:])
    assert max((a - b).abs().max().item() for a, b in zip(params[0], params[1])) < 1e-6
    assert fused.optimizer.state_dict()['state'][0]['step'].item() == 4


def test_each_epoch_trains_with_its_own_scheduled_lr(image_folder, monkeypatch):
    lrs = []

    def record(trainer, loader, epoch):
        lrs.append(trainer.optimizer.param_groups[0]['lr'])
        return {'lr': lrs[-1], 'loss': 1.0}

    monkeypatch.setattr(engine, 'train_one_epoch', record)
    monkeypatch.setattr(engine, 'evaluate', lambda *a, **k: {'acc1': 1.0, 'acc5': 1.0, 'loss': 1.0, 'num_images': 25})
    epochs, warmup, base, warmup_lr, min_lr = 6, 2, 4e-3, 1e-6, 1e-5
    run(*tiny_flags(image_folder, None, '--epochs', str(epochs), '--warmup-epochs', str(warmup), '--lr', str(base),
                    '--warmup-lr', str(warmup_lr), '--min-lr', str(min_lr)))
    peak = base * 8 / 512
    expected = [warmup_lr + e * (peak - warmup_lr) / warmup for e in range(warmup)]
    expected += [min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * e / epochs)) for e in range(warmup, epochs)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[0] == warmup_lr


# ----------------------------------------------------------------------------- resume and failure
def _weights(path, key='model'):
    return load_checkpoint(path)[key]


def test_resume_continues_bit_identically(image_folder, tmp_path, monkeypatch):
    extra = ('--model-ema', '--model-ema-decay', '0.9', '--drop', '0.1', '--mixup', '0.8', '--cutmix', '1.0',
             '--reprob', '0.5')
    run(*tiny_flags(image_folder, tmp_path / 'straight', *extra))

    real_train = engine.train_one_epoch

    def crash_in_second_epoch(trainer, loader, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_train(trainer, loader, epoch)

    monkeypatch.setattr(engine, 'train_one_epoch', crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(*tiny_flags(image_folder, tmp_path / 'resumed', *extra))
    monkeypatch.setattr(engine, 'train_one_epoch', real_train)
    run(*tiny_flags(image_folder, tmp_path / 'resumed', *extra, '--auto-resume'))

    for key in ('model', 'model_ema'):
        straight, resumed = _weights(tmp_path / 'straight/checkpoint.pth', key), _weights(
            tmp_path / 'resumed/checkpoint.pth', key)
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), key
    straight_log = (tmp_path / 'straight/log.txt').read_text().splitlines()
    assert (tmp_path / 'resumed/log.txt').read_text().splitlines() == straight_log


def test_non_finite_loss_stops_and_keeps_last_checkpoint(image_folder, tmp_path, monkeypatch):
    steps_per_epoch = 24 // 8
    calls = []
    real_forward = main.DistillationLoss.forward

    def nan_from_second_epoch(self, inputs, outputs, labels):
        calls.append(1)
        loss = real_forward(self, inputs, outputs, labels)
        return loss * float('nan') if len(calls) == steps_per_epoch + 2 else loss

    monkeypatch.setattr(main.DistillationLoss, 'forward', nan_from_second_epoch)
    saved = {}
    real_save = main.save_checkpoints

    def remember(args, output_dir, state, epoch, is_best):
        real_save(args, output_dir, state, epoch, is_best)
        saved['bytes'] = (output_dir / 'checkpoint.pth').read_bytes()
        saved['model'] = {k: v.clone() for k, v in state['model'].items()}

    monkeypatch.setattr(main, 'save_checkpoints', remember)
    with pytest.raises(engine.NonFiniteLossError, match='epoch 1, step 1'):
        run(*tiny_flags(image_folder, tmp_path))
    assert (tmp_path / 'checkpoint.pth').read_bytes() == saved['bytes']
    checkpoint = load_checkpoint(tmp_path / 'checkpoint.pth')
    assert checkpoint['epoch'] == 0
    assert all(torch.equal(checkpoint['model'][k], v) for k, v in saved['model'].items())
    assert len((tmp_path / 'log.txt').read_text().splitlines()) == 1


def test_throughput_reports_images_per_second(image_folder, capsys, monkeypatch):
    calls = []
    real_time_inference = engine.time_inference

    def shortened(model, images, *, warmup, runs, amp_dtype=None):
        calls.append((tuple(images.shape), warmup, runs))
        return real_time_inference(model, images, warmup=2, runs=5, amp_dtype=amp_dtype)

    monkeypatch.setattr(engine, 'time_inference', shortened)
    timing = run(*tiny_flags(image_folder), '--throughput')
    assert calls == [((12, 3, 32, 32), 50, 30)]  # one validation batch, the official 50 + 30 passes
    assert timing.min <= timing.median <= timing.max and timing.median > 0
    assert re.search(r'throughput: [\d.]+ images/s .*batch 12\)', capsys.readouterr().out)


def test_world_size_without_launcher_is_an_error(image_folder):
    with pytest.raises(RuntimeError, match='torchrun --nproc_per_node'):
        run(*tiny_flags(image_folder), '--world-size', '8')


def test_distillation_loads_the_teacher(image_folder, tmp_path):
    teacher_source = create_model('pcpvt_micro', num_classes=3)
    torch.save({'model': teacher_source.state_dict()}, tmp_path / 'teacher.pth')
    _, _, _, trainer, _ = _trainer(image_folder, '--distillation-type', 'hard', '--teacher-model', 'pcpvt_micro',
                                   '--teacher-path', str(tmp_path / 'teacher.pth'))
    teacher = trainer.criterion.teacher_model
    assert trainer.criterion.distillation_type == 'hard' and not teacher.training
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_source.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match='needs --teacher-path'):
        _trainer(image_folder, '--distillation-type', 'soft')


def test_eval_leaves_the_training_config_alone(trained, image_folder):
    before = (trained / 'config.yaml').read_text()
    run(*tiny_flags(image_folder, trained), '--eval', '--resume', str(trained / 'checkpoint.pth'))
    assert (trained / 'config.yaml').read_text() == before


def test_retain_memory_flag_is_applied_and_a_missing_mallopt_is_named(trained, image_folder, monkeypatch):
    calls = []
    monkeypatch.setattr(main.utils, 'retain_freed_memory', lambda: calls.append(True) or True)
    flags = [*tiny_flags(image_folder), '--eval', '--resume', str(trained / 'checkpoint.pth')]
    assert run(*flags, '--retain-memory') == run(*flags)  # same evaluation, to the last digit
    assert calls == [True]
    monkeypatch.setattr(main.utils, 'retain_freed_memory', lambda: False)
    with pytest.raises(SystemExit, match='glibc'):
        run(*flags, '--retain-memory')
