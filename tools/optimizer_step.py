"""Time one optimizer step over a model's parameters, per PyTorch implementation.

main.py builds AdamW as timm does (no weight decay on PEG, norm and bias parameters) and
runs it as PyTorch's fused kernel where the device has it. This times that step against the
per-parameter loop (PyTorch's CPU default, what `--no-fused-opt` keeps) and the foreach
implementation, on random gradients, alternating the implementations round by round:

    python tools/optimizer_step.py --model alt_gvt_small
    python tools/optimizer_step.py --model alt_gvt_large --device cuda --runs 50
"""
import argparse
import os
import statistics
import sys
import time

import torch
from timm.optim import create_optimizer_v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twins import MODEL_CONFIGS, create_model  # noqa: E402
from utils import fused_optimizer_kwargs  # noqa: E402

IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_seconds(optimizer, device, runs):
    """Seconds of each of `runs` optimizer steps (gradients stay in place between steps)."""
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alt_gvt_small", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--opt", default="adamw", choices=["adam", "adamw"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    names = [name for name in IMPLEMENTATIONS
             if name != "fused" or fused_optimizer_kwargs(args.opt, [torch.empty(0, device=device)])]
    optimizers, times = {}, {name: [] for name in names}
    for name in names:
        model = create_model(args.model).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizers[name] = create_optimizer_v2(model, opt=args.opt, lr=1e-4, weight_decay=0.05,
                                               **IMPLEMENTATIONS[name])
        step_seconds(optimizers[name], device, 3)  # warm-up: creates the state
    for _ in range(args.rounds):
        for name in names:
            times[name] += step_seconds(optimizers[name], device, args.runs)
    count = sum(p.numel() for group in optimizers[names[0]].param_groups for p in group["params"])
    print(f"{args.opt} step over {args.model}'s {count:,} parameters on {device} "
          f"(median of {args.rounds} x {args.runs} steps, min-max):")
    for name in names:
        print(f"  {name:8s} {1e3 * statistics.median(times[name]):7.1f} ms "
              f"({1e3 * min(times[name]):.1f}-{1e3 * max(times[name]):.1f})")


if __name__ == "__main__":
    main()
