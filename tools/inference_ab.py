"""Time a model's CPU inference with the native few-key attention kernel against PyTorch's.

At inference `twins.kernels` runs attention over at most `NATIVE_ATTENTION_KEYS` keys (fp32)
with the native kernel of `twins/native.cpp`. This alternates that setting with 0 (PyTorch's
kernel everywhere) in one process, the order swapped every round, each timed step after an
untimed one of the same setting, and prints each setting's median img/s, the per-round ratios
native / flash and their median; with --profile, the time each setting's profiled steps spend
in the attention operators:

    python tools/attention_ab.py --model alt_gvt_small --rounds 12
    python tools/attention_ab.py --model pcpvt_small_v0 --rounds 4 --profile
"""
import argparse
import contextlib
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark import inference_step, time_call  # noqa: E402
from twins import MODEL_CONFIGS, create_model, kernels, native  # noqa: E402

ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "twins_native::attention_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alt_gvt_small", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8, help="steps per setting")
    parser.add_argument("--profile", action="store_true",
                        help="profile each timed step and sum its attention operators")
    args = parser.parse_args()
    if native.ops() is None:
        print(f"native kernels {native.status()}: both settings run PyTorch's flash kernel")
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    step = inference_step(create_model(args.model), images, None)
    settings = {"flash": 0, "native": kernels.NATIVE_ATTENTION_KEYS}
    speed = {name: [] for name in settings}
    attention_ms = {name: [] for name in settings}
    for r in range(args.rounds):
        for name in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
            kernels.NATIVE_ATTENTION_KEYS = settings[name]
            step()  # untimed: the allocator's state as steps of this setting leave it
            profiling = profile(activities=[ProfilerActivity.CPU]) if args.profile else None
            with profiling or contextlib.nullcontext():
                seconds, _ = time_call(step, torch.device("cpu"))
            speed[name].append(args.batch_size / seconds)
            if profiling is not None:
                attention_ms[name].append(sum(e.self_cpu_time_total
                                              for e in profiling.key_averages()
                                              if e.key in ATTENTION_OPS) / 1e3)
    kernels.NATIVE_ATTENTION_KEYS = settings["native"]
    ratios = sorted(n / f for n, f in zip(speed["native"], speed["flash"]))
    print(f"{args.model} inference fp32, batch {args.batch_size}, {args.img_size}px, "
          f"{args.rounds} alternating rounds{' (profiled)' if args.profile else ''}:")
    for name in settings:
        line = (f"  {name:6s} {statistics.median(speed[name]):6.2f} img/s "
                f"({min(speed[name]):.2f}-{max(speed[name]):.2f})")
        if args.profile:
            line += f", attention ops {statistics.median(attention_ms[name]):.1f} ms per step"
        print(line)
    print(f"  native / flash: {statistics.median(ratios):.3f} "
          f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
