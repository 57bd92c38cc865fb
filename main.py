"""Train and evaluate Twins-PCPVT / Twins-SVT on ImageNet and other classification datasets.

    python main.py --model alt_gvt_small --data-path /data/imagenet --output-dir output/svt_s
    python main.py --config configs/alt_gvt_base.yaml --data-path /data/imagenet --output-dir out
    torchrun --nproc_per_node=8 main.py --model alt_gvt_base --batch-size 128 --data-path /data/imagenet --dist-eval
    python main.py --eval --resume alt_gvt_large.pth --model alt_gvt_large --data-path /data/imagenet

Every flag of the official Twins/DeiT main.py is accepted under its official spelling.
"""
import argparse
import datetime
import difflib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
import yaml
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torch.utils.tensorboard import SummaryWriter

import engine
import utils
from datasets import INAT_CATEGORY_LEVELS, build_dataset
from losses import DISTILLATION_TYPES, DistillationLoss, build_criterion
from samplers import DistributedEvalSampler, RASampler
from twins import create_model, list_models, resolve_name
from twins.checkpoint import CheckpointMismatchError, load_pretrained, torch_load

BASE_BATCH = 512  # --lr is given per this many images and scaled linearly with the global batch
BOOL = argparse.BooleanOptionalAction


# ----------------------------------------------------------------------------- configuration
def _add_model_args(parser):
    group = parser.add_argument_group('model')
    group.add_argument('--model', default='pcpvt_small_v0', help=f'one of: {", ".join(list_models(True))}')
    group.add_argument('--input-size', '--input_size', dest='input_size', type=int, default=224, help='image side')
    group.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    group.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate of the last block')
    group.add_argument('--grad-checkpointing', action=BOOL, default=False,
                       help='recompute block activations in backward to save memory')
    group.add_argument('--model-ema', action=BOOL, default=False, help='keep an EMA of the weights')
    group.add_argument('--model-ema-decay', type=float, default=0.99996, help='EMA decay per step')
    group.add_argument('--model-ema-eval', action=BOOL, default=False,
                       help='also evaluate the EMA each epoch; with --eval, evaluate the EMA weights of --resume')


def _add_optimizer_args(parser):
    group = parser.add_argument_group('optimizer')
    group.add_argument('--opt', default='adamw', help='any timm optimizer name')
    group.add_argument('--opt-eps', type=float, default=1e-8, help='optimizer epsilon')
    group.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    group.add_argument('--fused-opt', action=BOOL, default=True,
                       help="run adam/adamw as PyTorch's fused kernel where the device has it (one pass "
                            "over all parameters); --no-fused-opt keeps the per-parameter loop")
    group.add_argument('--clip-grad', type=float, default=None, help='max gradient norm (off by default)')
    group.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    group.add_argument('--weight-decay', type=float, default=0.05,
                       help='weight decay; never applied to PEG, norm and bias parameters')


def _add_schedule_args(parser):
    group = parser.add_argument_group('learning-rate schedule')
    group.add_argument('--sched', default='cosine', help='timm scheduler name')
    group.add_argument('--lr', type=float, default=5e-4,
                       help=f'learning rate per {BASE_BATCH} images; scaled by global batch / {BASE_BATCH}')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, help='lr noise on/off epoch fractions')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, help='lr noise limit percent')
    group.add_argument('--lr-noise-std', type=float, default=1.0, help='lr noise std-dev')
    group.add_argument('--warmup-lr', type=float, default=1e-6, help='lr at the start of warm-up (not scaled)')
    group.add_argument('--min-lr', type=float, default=1e-5, help='lower lr bound (not scaled)')
    group.add_argument('--decay-epochs', type=float, default=30, help='epochs between step decays')
    group.add_argument('--warmup-epochs', type=int, default=5, help='linear warm-up epochs')
    group.add_argument('--cooldown-epochs', type=int, default=10,
                       help='epochs at min-lr after the cycle; as in the official code, training stops '
                            'after --epochs, so this only matters when --epochs exceeds the cycle')
    group.add_argument('--patience-epochs', type=int, default=10, help='patience of the plateau scheduler')
    group.add_argument('--decay-rate', '--dr', dest='decay_rate', type=float, default=0.1, help='lr decay rate')


def _add_augmentation_args(parser):
    group = parser.add_argument_group('augmentation and regularisation')
    group.add_argument('--color-jitter', type=float, default=0.4, help='colour jitter factor')
    group.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='timm AutoAugment/RandAugment policy')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--train-interpolation', default='bicubic', help='random/bilinear/bicubic')
    group.add_argument('--repeated-aug', action=BOOL, default=True,
                       help='repeated augmentation sampler (distributed training only, as in DeiT)')
    group.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    group.add_argument('--remode', default='pixel', help='random erasing mode')
    group.add_argument('--recount', type=int, default=1, help='random erasing count')
    group.add_argument('--resplit', action=BOOL, default=False,
                       help='accepted for the official commands; like DeiT, the transform ignores it')
    group.add_argument('--eval-crop-ratio', type=float, default=0.875, help='centre-crop ratio for evaluation')
    group.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0 = off)')
    group.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0 = off)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix over mixup')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='how to mix')


def _add_distillation_args(parser):
    group = parser.add_argument_group('distillation (DeiT)')
    group.add_argument('--distillation-type', default='none', choices=DISTILLATION_TYPES, help='distillation loss')
    group.add_argument('--teacher-model', default='regnety_160', help='timm or Twins name of the teacher')
    group.add_argument('--teacher-path', default='', help='teacher checkpoint file')
    group.add_argument('--distillation-alpha', type=float, default=0.5, help='weight of the distillation loss')
    group.add_argument('--distillation-tau', type=float, default=1.0, help='soft distillation temperature')


def _add_data_args(parser):
    group = parser.add_argument_group('data')
    group.add_argument('--data-path', '--data_path', dest='data_path', default='/datasets01/imagenet_full_size/061417/',
                       help='dataset root (ImageFolder: with train/ and val/)')
    group.add_argument('--data-set', '--data_set', dest='data_set', default='IMNET',
                       choices=('IMNET', 'IMAGEFOLDER', 'CIFAR', 'CIFAR10', 'CIFAR100', 'INAT', 'INAT18', 'INAT19'),
                       help='dataset type')
    group.add_argument('--inat-category', default='name', choices=INAT_CATEGORY_LEVELS, help='iNaturalist label level')
    group.add_argument('--batch-size', '--batch_size', dest='batch_size', type=int, default=64, help='per process')
    group.add_argument('--num-workers', '--num_workers', dest='num_workers', type=int, default=10,
                       help='data loading workers per process')
    group.add_argument('--pin-mem', action=BOOL, default=True, help='pin CPU memory in the DataLoader')


def _add_run_args(parser):
    group = parser.add_argument_group('run')
    group.add_argument('--config', default=None, help='YAML file of defaults (keys: destinations below)')
    group.add_argument('--epochs', type=int, default=300, help='training epochs')
    group.add_argument('--output-dir', '--output_dir', dest='output_dir', default='',
                       help='where checkpoints, log.txt, config.yaml and TensorBoard events go (empty: save nothing)')
    default_device = 'cuda' if torch.cuda.is_available() else 'cpu'
    group.add_argument('--device', default=default_device,
                       help=f'cuda or cpu (default here: {default_device}, i.e. cuda when available)')
    group.add_argument('--seed', type=int, default=0, help='random seed (plus the rank in distributed runs)')
    group.add_argument('--resume', default='', help='checkpoint to continue from (or to evaluate with --eval)')
    group.add_argument('--auto-resume', action=BOOL, default=False, help='resume from <output-dir>/checkpoint.pth if present')
    group.add_argument('--finetune', default='', help='initialise from these weights (a classifier of another size is dropped)')
    group.add_argument('--start-epoch', '--start_epoch', dest='start_epoch', type=int, default=0,
                       help='first epoch when --resume holds weights only')
    group.add_argument('--save-freq', type=int, default=0, help='also keep checkpoint_<epoch>.pth every N epochs (0: never)')
    group.add_argument('--print-freq', type=int, default=10, help='progress line every N steps')
    group.add_argument('--eval', action=BOOL, default=False, help='only evaluate (weights from --resume)')
    group.add_argument('--throughput', '--throughout', dest='throughput', action=BOOL, default=False,
                       help='only measure inference images/s on one validation batch')
    group.add_argument('--amp', action=BOOL, default=False, help='mixed precision (autocast)')
    group.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                       help='autocast dtype (default: float16 with loss scaling on CUDA, bfloat16 on the CPU)')
    group.add_argument('--retain-memory', action=BOOL, default=False,
                       help='CPU: let glibc keep freed memory for reuse instead of page-faulting fresh '
                            'activations every step (faster; resident memory stays at its peak)')


def _add_distributed_args(parser):
    group = parser.add_argument_group('distributed (torchrun / torch.distributed.launch --use_env)')
    group.add_argument('--dist-eval', action=BOOL, default=False,
                       help='shard evaluation over processes (exact: no padded duplicates)')
    group.add_argument('--world-size', '--world_size', dest='world_size', type=int, default=1,
                       help='expected number of processes; the launcher\'s WORLD_SIZE must agree')
    group.add_argument('--dist-url', '--dist_url', dest='dist_url', default='env://', help='process group init method')
    group.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=None,
                       help='set by torch.distributed.launch without --use_env')


def get_args_parser():
    parser = argparse.ArgumentParser('Twins training and evaluation', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_add_model_args, _add_optimizer_args, _add_schedule_args, _add_augmentation_args,
                _add_distillation_args, _add_data_args, _add_run_args, _add_distributed_args):
        add(parser)
    return parser


def _config_defaults(parser, path):
    """Read a YAML config as parser defaults, with values converted and checked like flags."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except OSError as err:
        parser.error(f'cannot read --config {path}: {err.strerror}')
    if not isinstance(config, dict):
        parser.error(f'--config {path} must hold a mapping of option names to values')
    actions = {action.dest: action for action in parser._actions if action.dest not in ('help', 'config')}
    defaults = {}
    for key, value in config.items():
        if key not in actions:
            close = difflib.get_close_matches(str(key).replace('-', '_'), actions, n=3)
            hint = f'; did you mean {", ".join(close)}?' if close else '; keys are the option destinations, e.g. drop_path'
            parser.error(f'unknown key {key!r} in --config {path}{hint}')
        action = actions[key]
        convert = action.type or (lambda v: v)
        if isinstance(value, list):
            value = [convert(v) if isinstance(v, str) else v for v in value]
        elif isinstance(value, str):
            value = convert(value)  # YAML reads 5e-4 (no dot) as a string
        if action.choices is not None and value is not None and value not in action.choices:
            parser.error(f'--config {path}: {key} must be one of {list(action.choices)}, got {value!r}')
        defaults[key] = value
    return defaults


def parse_args(argv=None):
    """Flags, with defaults taken from --config when given; the command line wins."""
    parser = get_args_parser()
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        parser.set_defaults(**_config_defaults(parser, config_path))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class RunPlan:
    """Values derived once from the flags and the data, logged at startup."""
    world_size: int
    global_batch: int
    lr: float
    num_classes: int
    steps_per_epoch: int


def plan_run(args, dist_env, num_classes, train_loader):
    global_batch = args.batch_size * dist_env.world_size
    num_train_images, steps = len(train_loader.dataset), len(train_loader)
    if steps == 0:
        raise ValueError(f'the training set has {num_train_images} images, fewer than one global batch '
                         f'({args.batch_size} x {dist_env.world_size} processes); lower --batch-size.')
    plan = RunPlan(dist_env.world_size, global_batch, args.lr * global_batch / BASE_BATCH, num_classes, steps)
    utils.print_on_master(f'{num_classes} classes, {num_train_images} training images, {steps} steps/epoch; '
                          f'global batch {global_batch} = {args.batch_size} x {dist_env.world_size} processes; '
                          f'lr {plan.lr:.3e} = {args.lr:.3e} x {global_batch} / {BASE_BATCH}')
    return plan


def resolve_device(name, local_rank):
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'--device {name} was requested but CUDA is not available on this machine; '
                           'pass --device cpu to run on the CPU.')
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', local_rank)
    return device


def resolve_amp_dtype(args, device):
    if not args.amp:
        if args.amp_dtype is not None:
            raise ValueError('--amp-dtype needs --amp.')
        return None
    name = args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    if name == 'float16' and device.type != 'cuda':
        raise ValueError('float16 autocast with loss scaling needs CUDA; use --amp-dtype bfloat16 on the CPU.')
    return getattr(torch, name)


def prepare_output_dir(args):
    """Create the output directory and prove it is writable before any work starts."""
    if not args.output_dir:
        return None
    output_dir = Path(args.output_dir)
    probe = output_dir / f'.write-test-{os.getpid()}'
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as err:
        raise PermissionError(f'cannot write to --output-dir {output_dir}: {err.strerror or err}; '
                              'choose a writable directory.') from err
    if utils.is_main_process():
        with open(output_dir / 'config.yaml', 'w') as f:
            yaml.safe_dump(vars(args), f, sort_keys=True)
    return output_dir


@dataclass
class Data:
    val_loader: DataLoader
    num_classes: int
    train_loader: Optional[DataLoader] = None
    mixup_fn: Optional[Mixup] = None


def build_data(args, dist_env, with_train):
    dataset_val, num_classes = build_dataset(False, args)
    pin_memory = args.pin_mem and torch.cuda.is_available()  # pinning only helps copies to a GPU
    if args.dist_eval and dist_env.distributed:
        val_sampler = DistributedEvalSampler(dataset_val, dist_env.world_size, dist_env.rank)
    else:
        val_sampler = SequentialSampler(dataset_val)
    val_loader = DataLoader(dataset_val, sampler=val_sampler, batch_size=int(1.5 * args.batch_size),
                            num_workers=args.num_workers, pin_memory=pin_memory, drop_last=False)
    data = Data(val_loader, num_classes)
    if not with_train:
        return data
    dataset_train, _ = build_dataset(True, args)
    if dist_env.distributed and args.repeated_aug:
        train_sampler = RASampler(dataset_train, dist_env.world_size, dist_env.rank, shuffle=True, seed=args.seed)
    else:
        # Shuffled by seed + epoch, independent of the global RNG (also with one process).
        train_sampler = DistributedSampler(dataset_train, dist_env.world_size, dist_env.rank, shuffle=True,
                                           seed=args.seed)
    data.train_loader = DataLoader(dataset_train, sampler=train_sampler, batch_size=args.batch_size,
                                   num_workers=args.num_workers, pin_memory=pin_memory, drop_last=True)
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        data.mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                              prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                              label_smoothing=args.smoothing, num_classes=num_classes)
    return data


def load_weights(model, checkpoint, path, prefer_ema=False, finetune=False):
    """load_pretrained with the file name in the error."""
    try:
        load_pretrained(model, checkpoint, finetune=finetune, prefer_ema=prefer_ema)
    except (CheckpointMismatchError, ValueError) as err:
        raise type(err)(f'{path}: {err}') from err


def build_model(args, num_classes, device):
    model = create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path, drop_rate=args.drop)
    if args.finetune:
        load_weights(model, torch_load(args.finetune), args.finetune, finetune=True)
    model.set_grad_checkpointing(args.grad_checkpointing)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    utils.print_on_master(f'model {args.model}: {n_parameters:,} parameters')
    return model.to(device), n_parameters


def build_teacher(args, num_classes, device):
    if args.distillation_type == 'none':
        return None
    if not args.teacher_path:
        raise ValueError(f'--distillation-type {args.distillation_type} needs --teacher-path (weights of '
                         f'--teacher-model {args.teacher_model}).')
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes)
    load_weights(teacher, torch_load(args.teacher_path), args.teacher_path)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def build_trainer(args, model, data, plan, device, amp_dtype, dist_env):
    """Optimizer, scheduler, loss, EMA and (in distributed runs) the DDP wrapper."""
    optimizer_kwargs = {'eps': args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas:
        optimizer_kwargs['betas'] = tuple(args.opt_betas)
    if args.fused_opt:
        optimizer_kwargs.update(utils.fused_optimizer_kwargs(args.opt, model.parameters()))
    # With the model (not a parameter list), timm exempts 1-D parameters and model.no_weight_decay() (PEG).
    optimizer = utils.keep_implementation_on_load(create_optimizer_v2(
        model, opt=args.opt, lr=plan.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        **optimizer_kwargs))
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)
    criterion = DistillationLoss(build_criterion(args, data.mixup_fn is not None),
                                 build_teacher(args, plan.num_classes, device), args.distillation_type,
                                 args.distillation_alpha, args.distillation_tau)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    if dist_env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    trainer = engine.Trainer(model, criterion, optimizer, scaler, device, amp_dtype, model_ema,
                             data.mixup_fn, args.clip_grad, args.print_freq)
    return trainer, lr_scheduler


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_state(args, trainer, lr_scheduler, epoch, max_accuracy):
    """Everything --resume needs; plain types and tensors only (loads with weights_only=True)."""
    state = {
        'model': engine.unwrap(trainer.model).state_dict(),
        'optimizer': trainer.optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'scaler': trainer.scaler.state_dict(),
        'epoch': epoch,
        'max_accuracy': max_accuracy,
        'args': vars(args).copy(),
        'rng_states': utils.gather_rng_states(),  # one entry per rank
    }
    if trainer.model_ema is not None:
        state['model_ema'] = trainer.model_ema.module.state_dict()
    return state


def find_resume_checkpoint(args, output_dir):
    if args.resume:
        return args.resume
    if args.auto_resume and output_dir is not None and (output_dir / 'checkpoint.pth').is_file():
        return str(output_dir / 'checkpoint.pth')
    return None


def resume_training(args, trainer, lr_scheduler, path):
    """Restore a training checkpoint; returns (start epoch, best accuracy so far)."""
    checkpoint = torch_load(path)
    load_weights(engine.unwrap(trainer.model), checkpoint, path)
    if not isinstance(checkpoint, dict) or 'optimizer' not in checkpoint:
        utils.print_on_master(f'{path} holds weights only; training starts at epoch {args.start_epoch}')
        return args.start_epoch, 0.0
    trainer.optimizer.load_state_dict(checkpoint['optimizer'])  # keeps this run's implementation
    lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    if checkpoint.get('scaler'):
        trainer.scaler.load_state_dict(checkpoint['scaler'])
    if trainer.model_ema is not None:
        ema_source = checkpoint if 'model_ema' in checkpoint else checkpoint['model']
        load_weights(trainer.model_ema.module, ema_source, path, prefer_ema='model_ema' in checkpoint)
    rng_states = checkpoint.get('rng_states') or []
    if len(rng_states) == utils.get_world_size():
        # Last, so that nothing between here and the first batch draws from the restored generators.
        utils.restore_rng_state(rng_states[utils.get_rank()])
    else:
        utils.print_on_master(f'{path}: no RNG state for {utils.get_world_size()} processes; '
                              'augmentation randomness will differ from an uninterrupted run')
    start_epoch = checkpoint['epoch'] + 1
    utils.print_on_master(f'resumed from {path}: continuing at epoch {start_epoch}')
    return start_epoch, checkpoint.get('max_accuracy', 0.0)


def save_checkpoints(args, output_dir, state, epoch, is_best):
    names = ['checkpoint.pth']
    if args.save_freq and (epoch + 1) % args.save_freq == 0:
        names.append(f'checkpoint_{epoch}.pth')
    if is_best:
        names.append('checkpoint_best.pth')
    for name in names:
        utils.save_on_master(state, output_dir / name)


# ----------------------------------------------------------------------------- run
def run_evaluation(args, model, data, device, amp_dtype):
    if not args.resume and not args.finetune:
        raise ValueError('--eval needs weights: pass --resume <checkpoint>.')
    if args.resume:
        load_weights(model, torch_load(args.resume), args.resume, prefer_ema=args.model_ema_eval)
    stats = engine.evaluate(model, data.val_loader, device, amp_dtype, sum_across_ranks=args.dist_eval,
                            print_freq=args.print_freq)
    utils.print_on_master(f"Accuracy of the network on the {stats['num_images']} test images: {stats['acc1']:.1f}%")
    return stats


def log_epoch(output_dir, writer, record):
    if output_dir is None or not utils.is_main_process():
        return
    with open(output_dir / 'log.txt', 'a') as f:
        f.write(json.dumps(record) + '\n')
    for key, value in record.items():
        if key not in ('epoch', 'n_parameters'):
            writer.add_scalar(key.replace('_', '/', 1), value, record['epoch'])
    writer.flush()


def fit(args, trainer, lr_scheduler, data, start_epoch, max_accuracy, output_dir, n_parameters):
    """The epoch loop: schedule, train, evaluate, save, log."""
    writer = SummaryWriter(str(output_dir)) if output_dir is not None and utils.is_main_process() else None
    sum_across_ranks = args.dist_eval and utils.get_world_size() > 1
    evaluate = functools.partial(engine.evaluate, loader=data.val_loader, device=trainer.device,
                                 amp_dtype=trainer.amp_dtype, sum_across_ranks=sum_across_ranks,
                                 print_freq=args.print_freq)
    last_acc1 = None
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        data.train_loader.sampler.set_epoch(epoch)
        # Set the lr at the start of the epoch so epoch e trains with the schedule's value for e
        # (the official code stepped at the end of the epoch, one epoch late).
        lr_scheduler.step(epoch, last_acc1)
        train_stats = engine.train_one_epoch(trainer, data.train_loader, epoch)
        test_stats = evaluate(engine.unwrap(trainer.model))
        last_acc1 = test_stats['acc1']
        utils.print_on_master(f"Accuracy of the network on the {test_stats['num_images']} test images: "
                              f"{last_acc1:.1f}%")
        is_best = last_acc1 > max_accuracy
        max_accuracy = max(max_accuracy, last_acc1)
        utils.print_on_master(f'Max accuracy: {max_accuracy:.2f}%')
        if output_dir is not None:
            state = checkpoint_state(args, trainer, lr_scheduler, epoch, max_accuracy)
            save_checkpoints(args, output_dir, state, epoch, is_best)
        record = {'train_lr': train_stats['lr'], 'train_loss': train_stats['loss'],
                  **{f'test_{k}': test_stats[k] for k in ('loss', 'acc1', 'acc5')}}
        if trainer.model_ema is not None and args.model_ema_eval:
            ema_stats = evaluate(trainer.model_ema.module)
            record.update({f'test_ema_{k}': ema_stats[k] for k in ('loss', 'acc1', 'acc5')})
        log_epoch(output_dir, writer, {**record, 'epoch': epoch, 'n_parameters': n_parameters})
    if writer is not None:
        writer.close()
    utils.print_on_master(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return max_accuracy


def main(args):
    resolve_name(args.model)  # an unknown name fails before any data is read
    device = resolve_device(args.device, int(os.environ.get('LOCAL_RANK', args.local_rank or 0)))
    dist_env = utils.init_distributed_mode(device.type, args.local_rank, args.dist_url)
    if args.retain_memory and not utils.retain_freed_memory():
        raise SystemExit('--retain-memory needs glibc (mallopt), which this platform does not have')
    if args.world_size not in (1, dist_env.world_size):
        raise RuntimeError(f'--world-size {args.world_size} but {dist_env.world_size} process(es) were launched; '
                           'start N processes with torchrun --nproc_per_node=N main.py ...')
    amp_dtype = resolve_amp_dtype(args, device)
    training = not (args.eval or args.throughput)
    # Evaluation writes nothing, so it never replaces the config.yaml of the training run.
    output_dir = prepare_output_dir(args) if training else None
    utils.seed_everything(args.seed + dist_env.rank)
    utils.print_on_master(' '.join(sys.argv) + '\n' + json.dumps(vars(args)))

    data = build_data(args, dist_env, with_train=training)
    model, n_parameters = build_model(args, data.num_classes, device)
    if args.throughput:
        return engine.throughput(model, data.val_loader, device, amp_dtype)
    if args.eval:
        return run_evaluation(args, model, data, device, amp_dtype)

    plan = plan_run(args, dist_env, data.num_classes, data.train_loader)
    trainer, lr_scheduler = build_trainer(args, model, data, plan, device, amp_dtype, dist_env)
    resume_path = find_resume_checkpoint(args, output_dir)
    start_epoch, max_accuracy = args.start_epoch, 0.0
    if resume_path:
        start_epoch, max_accuracy = resume_training(args, trainer, lr_scheduler, resume_path)
    return fit(args, trainer, lr_scheduler, data, start_epoch, max_accuracy, output_dir, n_parameters)


if __name__ == '__main__':
    main(parse_args())
    if utils.is_dist_avail_and_initialized():
        torch.distributed.destroy_process_group()
