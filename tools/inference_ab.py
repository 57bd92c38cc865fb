"""Time two settings of a model's CPU inference against each other, alternating in one process.

--compare attention (fp32): PyTorch's flash kernel everywhere ("flash":
`NATIVE_ATTENTION_KEYS` 0) against the native few-key attention kernel of `twins/native.cpp`
("native", the default setting).
--compare attention-bf16: the same under bf16 autocast, where the native kernel takes bf16
operands on CPUs without AMX (`NATIVE_ATTENTION_DTYPES`).
--compare emulated-bf16: bf16 autocast computed in fp32 on bf16-rounded operands, as on CPUs
without bf16 instructions (forced here on any CPU): the plain modules ("plain") against the
chunked residual branches ("branches", the default setting).
--compare onednn (fp32): the chunk matmuls by MKL's sgemm ("sgemm") against oneDNN's matmul
where it applies (fc1 and fc2; "onednn", the default setting; `kernels.ONEDNN_MATMULS`).
--compare pool (fp32): the full-size outputs of the residual branches, PEGs and patch
embeddings allocated afresh ("fresh") against taken from the pool of reusable storages
(`kernels.reusable_empty`; "pooled", the default setting).

The order swaps every round and each timed step follows an untimed one of the same setting.
Prints each setting's median img/s and fresh memory page-faulted in per step, the per-round
ratios (second setting / first) and their median; with --profile, each setting's median time
per profiled step in the attention operators (attention), or in matmul/convolution/attention
kernels and in all operators (emulated-bf16):

    python tools/inference_ab.py --model alt_gvt_small --rounds 12
    python tools/inference_ab.py --model pcpvt_small_v0 --rounds 4 --profile
    python tools/inference_ab.py --compare attention-bf16 --model alt_gvt_base --rounds 8
    python tools/inference_ab.py --compare emulated-bf16 --model alt_gvt_small --rounds 8
    python tools/inference_ab.py --compare pool --model alt_gvt_base --rounds 8
    python tools/inference_ab.py --compare onednn --model alt_gvt_small --rounds 12
"""
import argparse
import contextlib
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark import inference_step, kernel_category, time_call  # noqa: E402
from twins import MODEL_CONFIGS, create_model, kernels, native  # noqa: E402


def attention_settings() -> Tuple[Tuple[str, str], Callable[[str], None], Optional[torch.dtype]]:
    """The two settings of --compare attention, the function selecting one, the autocast dtype."""
    if native.ops() is None:
        print(f"native kernels {native.status()}: both settings run PyTorch's flash kernel")
    native_keys = kernels.NATIVE_ATTENTION_KEYS

    def use(name: str) -> None:
        kernels.NATIVE_ATTENTION_KEYS = 0 if name == "flash" else native_keys
    return ("flash", "native"), use, None


def attention_bf16_settings() -> Tuple[Tuple[str, str], Callable[[str], None],
                                       Optional[torch.dtype]]:
    """The same for --compare attention-bf16."""
    if torch.bfloat16 not in kernels.NATIVE_ATTENTION_DTYPES:
        print("this CPU has AMX: bf16 attention runs PyTorch's flash kernel in both settings")
    names, use, _ = attention_settings()
    return names, use, torch.bfloat16


def emulated_bf16_settings() -> Tuple[Tuple[str, str], Callable[[str], None], Optional[torch.dtype]]:
    """The same for --compare emulated-bf16. The plain setting is the branches' condition with
    emulated autocast excluded, as it was before they took it."""
    kernels._CPU_NATIVE[torch.bfloat16] = False  # emulate, also on CPUs with bf16 kernels
    branches = kernels.inference_applies

    def plain(x: torch.Tensor) -> bool:
        return branches(x) and kernels.emulated_autocast_dtype(x) is None

    def use(name: str) -> None:
        kernels.inference_applies = branches if name == "branches" else plain
    return ("plain", "branches"), use, torch.bfloat16


def pool_settings() -> Tuple[Tuple[str, str], Callable[[str], None], Optional[torch.dtype]]:
    """The same for --compare pool."""
    def use(name: str) -> None:
        kernels._REUSABLE.enabled = name == "pooled"  # this thread's pool, as allocate_plainly
    return ("fresh", "pooled"), use, None


def onednn_settings() -> Tuple[Tuple[str, str], Callable[[str], None], Optional[torch.dtype]]:
    """The same for --compare onednn."""
    def use(name: str) -> None:
        kernels.ONEDNN_MATMULS = name == "onednn"
    return ("sgemm", "onednn"), use, None


SETTINGS = {"attention": attention_settings, "attention-bf16": attention_bf16_settings,
            "emulated-bf16": emulated_bf16_settings, "pool": pool_settings,
            "onednn": onednn_settings}


def profiled_ms(prof, compare: str) -> Dict[str, float]:
    """Milliseconds of a profiled step: in the attention operators (attention), or in the
    kernels and in all operators (emulated-bf16, pool, onednn)."""
    times: Dict[str, float] = {}
    for event in prof.key_averages():
        category = kernel_category(event.key)
        if compare.startswith("attention"):
            keys = ["attention ops"] if category == "attention" else []
        else:
            keys = ["all ops"] + (["kernels"] if category != "other" else [])
        for key in keys:
            times[key] = times.get(key, 0.0) + event.self_cpu_time_total / 1e3
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", default="attention", choices=sorted(SETTINGS))
    parser.add_argument("--model", default="alt_gvt_small", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8, help="steps per setting")
    parser.add_argument("--profile", action="store_true",
                        help="profile each timed step and sum the time of its operators")
    args = parser.parse_args()
    names, use, amp_dtype = SETTINGS[args.compare]()
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    step = inference_step(create_model(args.model), images, amp_dtype)
    speed: Dict[str, List[float]] = {name: [] for name in names}
    faulted: Dict[str, List[float]] = {name: [] for name in names}
    profiled: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            use(name)
            step()  # untimed: the allocator's state as steps of this setting leave it
            profiling = profile(activities=[ProfilerActivity.CPU]) if args.profile else None
            with profiling or contextlib.nullcontext():
                seconds, mib = time_call(step, torch.device("cpu"))
            speed[name].append(args.batch_size / seconds)
            faulted[name].append(mib)
            if profiling is not None:
                profiled[name].append(profiled_ms(profiling, args.compare))
    use(names[1])
    ratios = sorted(b / a for a, b in zip(speed[names[0]], speed[names[1]]))
    precision = ("fp32" if amp_dtype is None
                 else "bf16 (emulated)" if args.compare == "emulated-bf16" else "bf16")
    print(f"{args.model} inference {precision}, batch {args.batch_size}, {args.img_size}px, "
          f"{args.rounds} alternating rounds{' (profiled)' if args.profile else ''}:")
    for name in names:
        line = (f"  {name:8s} {statistics.median(speed[name]):6.2f} img/s "
                f"({min(speed[name]):.2f}-{max(speed[name]):.2f}), "
                f"{statistics.median(faulted[name]):.0f} MiB faulted")
        for key in sorted({k for times in profiled[name] for k in times}):
            line += (f", {key} {statistics.median(t.get(key, 0.0) for t in profiled[name]):.1f}"
                     f" ms per step")
        print(line)
    print(f"  {names[1]} / {names[0]}: {statistics.median(ratios):.3f} "
          f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
