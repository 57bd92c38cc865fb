"""benchmark.py's own logic, on the micro models (and one real timm model) with tiny runs."""
import argparse
import json
import mmap
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import benchmark
import twins
from twins import native
from benchmark import Config, Timing


def test_timing_statistics_are_images_per_second():
    timing = benchmark.timing_from_seconds([0.5, 0.25, 1.0], batch_size=4)
    assert (timing.median, timing.min, timing.max) == (8.0, 4.0, 16.0)


def test_ratio_of_medians_and_of_paired_runs():
    ours = benchmark.timing_from_seconds([1.0, 1.0, 2.0], 8)
    timm = benchmark.timing_from_seconds([2.0, 3.0, 2.0], 8)
    r = benchmark.ratio(ours, timm)
    assert r["of_medians"] == pytest.approx(8.0 / 4.0)  # medians 8 and 4 img/s
    assert r["paired_median"] == pytest.approx(2.0)  # per-run ratios 2, 3, 1


def test_time_call_counts_the_memory_faulted_in():
    """A step that touches 64 MiB of freshly mapped memory faults in at least that much."""
    def touch_fresh_memory():
        with mmap.mmap(-1, 64 * 2 ** 20) as m:
            for i in range(0, len(m), mmap.PAGESIZE):
                m[i] = 1
    seconds, mib = benchmark.time_call(touch_fresh_memory, torch.device("cpu"))
    assert seconds > 0 and 64 <= mib < 80
    assert benchmark.time_call(lambda: None, torch.device("cpu"))[1] < 1
    timing = benchmark.timing_from_seconds([1.0, 1.0, 1.0], 2, faulted_mib=[3.0, 70.0, 5.0])
    assert timing.median_faulted_mib == 5.0
    assert benchmark.timing_from_seconds([1.0], 2).median_faulted_mib is None


def test_time_inference_returns_one_timing_per_run():
    model = twins.create_model("alt_gvt_micro", num_classes=5)
    timing = benchmark.time_inference(model, torch.randn(2, 3, 32, 32), warmup=1, runs=3)
    assert isinstance(timing, Timing) and len(timing.seconds) == 3
    assert 0 < timing.min <= timing.median <= timing.max
    assert not model.training


def test_train_step_updates_the_weights():
    torch.manual_seed(0)
    model = twins.create_model("pcpvt_micro", num_classes=5)
    before = model.head.weight.detach().clone()
    step = benchmark.train_step(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 3]), None)
    loss = step()
    assert torch.isfinite(loss) and not torch.equal(before, model.head.weight)


@pytest.mark.parametrize("name, category", [
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("mkldnn::_linear_pointwise", "matmul"),
    ("aten::bmm", "matmul"), ("aten::mkldnn_convolution", "conv"),
    ("aten::convolution_backward", "conv"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("twins_native::attention_", "attention"), ("twins::window_attention_residual", "other"),
    ("twins::flash_attention", "other"),
    ("aten::copy_", "other"), ("aten::gelu", "other"), ("aten::native_layer_norm", "other")])
def test_kernel_category(name, category):
    assert benchmark.kernel_category(name) == category


def test_kernel_shares_from_profiler_events():
    events = [SimpleNamespace(key="aten::addmm", self_cpu_time_total=60.0),
              SimpleNamespace(key="aten::mkldnn_convolution", self_cpu_time_total=20.0),
              SimpleNamespace(key="aten::copy_", self_cpu_time_total=20.0)]
    shares = benchmark.kernel_shares(events, torch.device("cpu"))
    assert shares["matmul"] == pytest.approx(0.6) and shares["conv"] == pytest.approx(0.2)
    assert shares["kernels"] == pytest.approx(0.8) and shares["other"] == pytest.approx(0.2)


def test_kernel_shares_of_an_empty_profile_is_an_error():
    with pytest.raises(ValueError, match="no operator time"):
        benchmark.kernel_shares([SimpleNamespace(key="aten::mm", self_cpu_time_total=0.0)],
                                torch.device("cpu"))


def _toy_step(calls):
    """A step whose second call runs matmuls, the others additions, each call taking 0.2 s
    longer than the one before."""
    a = torch.randn(256, 256)

    def step():
        calls.append(1)
        time.sleep(0.2 * (len(calls) - 1))
        return [torch.mm(a, a) if len(calls) == 2 else a + a for _ in range(20)]
    return step


def test_profile_step_reports_the_step_nearest_the_timed_median(capsys):
    calls = []
    shares, profiled = benchmark.profile_step(_toy_step(calls), torch.device("cpu"), "toy",
                                              typical_seconds=0.21, steps=3)
    assert len(calls) == 3
    assert shares["matmul"] > 0.9 and shares["kernels"] == pytest.approx(1 - shares["other"])
    assert profiled["seconds"] == profiled["all_seconds"][1] and len(profiled["all_seconds"]) == 3
    assert profiled["all_seconds"][0] < 0.2 < profiled["all_seconds"][1] < 0.4 < profiled["all_seconds"][2]
    assert all(mib >= 0 for mib in profiled["all_faulted_mib"])
    assert "profiled step 2 of 3" in capsys.readouterr().out


def test_profile_step_without_a_timed_median_reports_the_last():
    shares, profiled = benchmark.profile_step(_toy_step([]), torch.device("cpu"), "toy", steps=3)
    assert shares["matmul"] == 0 and profiled["seconds"] == profiled["all_seconds"][2]


def test_fp16_on_cpu_is_refused():
    cfg = Config("pcpvt_micro", 1, 32, "fp16", "inference")
    with pytest.raises(ValueError, match="CUDA"):
        benchmark.make_step(torch.nn.Identity(), cfg, torch.randn(1, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(SystemExit, match="fp16 is for CUDA devices only"):  # before any timing
        benchmark.main(["--model", "pcpvt_micro", "--precision", "fp32", "fp16", "--device", "cpu"])


def test_matmul_rate_is_the_flops_over_the_median_time(monkeypatch):
    seconds = iter([0.004, 0.001, 0.002])
    monkeypatch.setattr(benchmark, "time_call", lambda fn, device: (next(seconds), 0.0))
    rate = benchmark.matmul_rate(torch.device("cpu"), torch.float32, size=8, runs=3)
    assert rate == pytest.approx(2 * 8 ** 3 / 0.002 / 1e9)


def test_copy_rate_counts_the_bytes_read_and_written(monkeypatch):
    assert benchmark.copy_rate(torch.device("cpu"), mib=8, runs=2) > 0.1  # GB/s: any machine
    seconds = iter([0.3, 0.1, 0.2])
    monkeypatch.setattr(benchmark, "time_call", lambda fn, device: (next(seconds), 0.0))
    rate = benchmark.copy_rate(torch.device("cpu"), mib=1, runs=3)
    assert rate == pytest.approx(2 * 2 ** 20 / 0.2 / 1e9)


def test_matmul_rates_measure_fp32_and_each_precision_asked_once():
    rates = benchmark.matmul_rates(torch.device("cpu"), ["bf16", "fp32", "bf16"])
    assert list(rates) == ["fp32", "bf16"]
    assert all(rate > 0.1 for rate in rates.values())  # GFLOP/s: any CPU manages this


def test_compare_timm_refuses_models_without_counterpart():
    with pytest.raises(ValueError, match="no counterpart"):
        benchmark.timm_name("alt_gvt_micro")
    with pytest.raises(SystemExit, match="timm has no counterpart of 'alt_gvt_micro'"):
        benchmark.main(["--model", "alt_gvt_micro", "--compare-timm", "--runs", "1"])


def test_source_revision_names_the_commit_and_local_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # even inside a checkout

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert benchmark.source_revision(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "model.py").write_text("a = 1\n")
    git("add", "model.py")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "--short=12", "HEAD").strip()
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert benchmark.source_revision(tmp_path) == commit
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "benchmark_old.md").write_text("a log\n")
    git("add", "logs/benchmark_old.md")
    git("commit", "-q", "-m", "log")
    commit = git("rev-parse", "--short=12", "HEAD").strip()
    (tmp_path / "logs" / "benchmark_old.md").write_text("rewritten by a benchmark run\n")
    assert benchmark.source_revision(tmp_path) == commit + "+changes"
    assert benchmark.source_revision(tmp_path, ignore=tmp_path / "logs") == commit
    (tmp_path / "model.py").write_text("a = 2\n")
    assert benchmark.source_revision(tmp_path, ignore=tmp_path / "logs") == commit + "+changes"
    # Outputs written to the checkout's top folder hide nothing else.
    assert benchmark.source_revision(tmp_path, ignore=tmp_path) == commit + "+changes"
    outside = tmp_path.parent / (tmp_path.name + "-out")  # an output folder outside the checkout
    assert benchmark.source_revision(tmp_path, ignore=outside) == commit + "+changes"


def test_environment_records_performance_variables(tmp_path, monkeypatch):
    for name in benchmark.PERFORMANCE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert benchmark.environment(torch.device("cpu"))["env"] == {}
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("TWINS_UNRELATED", "x")  # not a performance setting: not recorded
    env = benchmark.environment(torch.device("cpu"))
    assert env["env"] == {"THP_MEM_ALLOC_ENABLE": "1", "OMP_NUM_THREADS": "2"}
    args = argparse.Namespace(output_dir=str(tmp_path), name="envtest")
    benchmark.write_results([], args, env, "python benchmark.py")
    header = (tmp_path / "benchmark_envtest.md").read_text().splitlines()[0]
    assert header.endswith(", with THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=2")
    assert f" on {benchmark.cpu_model()} ({torch.backends.cpu.get_cpu_capability()})" in header
    data = json.loads((tmp_path / "benchmark_envtest.json").read_text())
    assert data["environment"]["env"] == env["env"]
    assert data["environment"]["native_kernels"] == native.status()
    monkeypatch.setenv("TWINS_NATIVE", "0")  # the native kernels turned off: recorded as such
    env = benchmark.environment(torch.device("cpu"))
    assert env["env"]["TWINS_NATIVE"] == "0" and env["native_kernels"] == "off (TWINS_NATIVE=0)"


def test_cpu_model_names_the_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
                    "flags\t\t: fpu avx2\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert benchmark.cpu_model(str(info)) == "AMD EPYC 7B13"
    info.write_text("processor\t: 0\nmodel name\t:\n")  # blank: the architecture instead
    assert benchmark.cpu_model(str(info)) == (platform.processor() or platform.machine())
    assert benchmark.cpu_model(str(tmp_path / "missing")) == (platform.processor()
                                                              or platform.machine())


def _ended(pid: int) -> bool:
    """Whether process `pid` is gone, or a zombie (dead, waiting for a parent to reap it)."""
    if not os.path.isdir("/proc"):  # macOS: ask the kernel (orphans are reaped there)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_worker_processes_end_with_the_benchmark():
    """Killing a benchmark run (here with SIGKILL, which runs no cleanup) also ends the worker
    process timing a model for it, instead of leaving it to skew what is timed next."""
    script = ("import os, time, benchmark\n"
              "pool = benchmark.worker_pool()\n"
              "print(pool.submit(os.getpid).result(), flush=True)\n"
              "pool.submit(time.sleep, 300)\n"
              "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(benchmark.__file__).parent)
    worker = None
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.5)  # the worker is in time.sleep(300) now
        assert not _ended(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _ended(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ended(worker), "the worker outlived the benchmark process"
    finally:
        parent.kill()
        if worker is not None and not _ended(worker):
            os.kill(worker, signal.SIGKILL)


def test_main_writes_json_and_markdown(tmp_path):
    rows = benchmark.main(["--model", "alt_gvt_micro", "--batch-size", "2", "--img-size", "32",
                           "--precision", "fp32", "bf16", "--mode", "inference", "train",
                           "--warmup", "0", "--runs", "2", "--no-memory", "--profile",
                           "--no-isolate", "--output-dir", str(tmp_path), "--name", "unit"])
    data = json.loads((tmp_path / "benchmark_unit.json").read_text())
    assert data["command"].startswith("python benchmark.py --model alt_gvt_micro")
    assert {"commit", "torch", "timm", "device", "threads"} <= set(data["environment"])
    revision = benchmark.source_revision(ignore=tmp_path)
    assert data["environment"]["commit"] == revision
    header = (tmp_path / "benchmark_unit.md").read_text().splitlines()[0]
    machine = f"` on {benchmark.cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    assert machine + (f" at commit {revision};" if revision else ";") in header
    rates = data["environment"]["matmul_gflops"]  # at the start of the run and at its end
    assert [list(rates[when]) for when in ("start", "end")] == [["fp32", "bf16"]] * 2
    copies = data["environment"]["copy_gbps"]
    assert header.endswith("; matmul GFLOP/s (start / end): "
                           + ", ".join(f"{p} {rates['start'][p]:,.0f} / {rates['end'][p]:,.0f}"
                                       for p in ("fp32", "bf16"))
                           + f"; copy GB/s {copies['start']:,.1f} / {copies['end']:,.1f}")
    assert len(data["rows"]) == len(rows) == 4
    row = data["rows"][0]
    assert row["config"] == dict(model="alt_gvt_micro", batch_size=2, img_size=32, precision="fp32",
                                 mode="inference", compile=False, channels_last=False,
                                 grad_checkpointing=False)
    assert len(row["ours"]["timing"]["seconds"]) == 2 and row["ours"]["timing"]["median"] > 0
    faulted = row["ours"]["timing"]["faulted_mib"]
    assert len(faulted) == 2 and all(mib >= 0 for mib in faulted)
    assert 0 < row["ours"]["kernel_share"]["kernels"] <= 1
    assert row["ours"]["profiled_step"]["seconds"] > 0  # the profiled step's own time, to compare
    table = (tmp_path / "benchmark_unit.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| alt_gvt_micro")]
    assert len(body) == 4 and "| bf16 | train |" in body[3]
    header = table[2].split(" | ")
    cells = body[0].split(" | ")
    assert len(cells) == len(header)
    faulted_cell = cells[header.index("faulted MiB/step ours / timm")]
    assert faulted_cell == f"{statistics.median(faulted):,.0f} / -"
    assert table[0].startswith("Command: `python benchmark.py")


def test_compare_timm_on_a_real_timm_model(tmp_path):
    rows = benchmark.main(["--model", "pcpvt_small_v0", "--batch-size", "1", "--img-size", "64",
                           "--warmup", "0", "--runs", "2", "--compare-timm", "--no-memory",
                           "--precision", "fp32", "bf16", "--bf16-agreement", "4",
                           "--no-isolate", "--output-dir", str(tmp_path), "--name", "timm"])
    assert "top1_agreement" not in rows[0]["ours"]  # fp32 row
    agreement = [rows[1][impl]["top1_agreement"] for impl in ("ours", "timm")]
    assert all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in agreement)  # shares of 4 images
    row = rows[0]
    assert row["max_logit_diff"] <= 1e-4
    assert row["ratio"]["of_medians"] == pytest.approx(
        row["ours"]["timing"]["median"] / row["timm"]["timing"]["median"])
    line = [x for x in (tmp_path / "benchmark_timm.md").read_text().splitlines() if x.startswith("| pcpvt")][0]
    assert f"{row['ratio']['of_medians']:.2f}x" in line and f"{row['max_logit_diff']:.1e}" in line


def test_checkpoint_weights_and_class_count_reach_ours_and_timms(tmp_path):
    torch.manual_seed(3)
    source = twins.create_model("alt_gvt_small", num_classes=3)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict()}, path)  # the official layout
    cfg = Config("alt_gvt_small", 1, 64, "fp32", "inference")
    models = benchmark.build_models(cfg, ("ours", "timm"), torch.device("cpu"), seed=0,
                                    checkpoint=str(path))
    for model in models.values():
        assert model.num_classes == 3
        state = model.state_dict()
        assert all(torch.equal(state[key], value) for key, value in source.state_dict().items())


def write_grey_images(folder, count):
    """Images 00..count-1 of grey level 20 * index, alternately in two class folders."""
    for i in range(count):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (20 * i,) * 3).save(folder / f"class{i % 2}" / f"{i:02d}.png")


def test_load_images_spreads_over_the_sorted_files_with_the_eval_transform(tmp_path):
    write_grey_images(tmp_path, 10)
    files = benchmark.image_files(str(tmp_path))
    assert [f.name for f in files[:6]] == ["00.png", "02.png", "04.png", "06.png", "08.png", "01.png"]
    batch = benchmark.load_images(str(tmp_path), 4, 32)
    assert batch.shape == (4, 3, 32, 32)
    chosen = [int(files[i].stem) for i in (0, 2, 5, 7)]  # 4 of 10, evenly spread
    expected = [(20 * i / 255 - IMAGENET_DEFAULT_MEAN[0]) / IMAGENET_DEFAULT_STD[0] for i in chosen]
    assert batch[:, 0, 5, 5].tolist() == pytest.approx(expected, abs=1e-5)
    assert benchmark.load_images(str(tmp_path), 256, 32).shape[0] == 10  # fewer files: all


def test_bf16_agreement_on_given_images_with_given_weights(tmp_path):
    write_grey_images(tmp_path / "images", 6)
    torch.save(twins.create_model("pcpvt_micro", num_classes=4).state_dict(), tmp_path / "w.pth")
    rows = benchmark.main(["--model", "pcpvt_micro", "--batch-size", "2", "--img-size", "32",
                           "--precision", "bf16", "--mode", "train", "--warmup", "0",
                           "--runs", "1", "--no-memory", "--no-isolate",
                           "--checkpoint", str(tmp_path / "w.pth"), "--images",
                           str(tmp_path / "images"), "--bf16-agreement", "8",
                           "--output-dir", str(tmp_path), "--name", "agreement"])
    assert rows[0]["agreement_images"] == 6
    assert rows[0]["ours"]["top1_agreement"] in [i / 6 for i in range(7)]


def test_bad_checkpoint_or_image_folder_fail_before_timing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    for option, message in [(["--checkpoint", str(tmp_path / "none.pth")], "checkpoint file not found"),
                            (["--images", str(tmp_path / "missing")], "no such folder"),
                            (["--images", str(tmp_path / "empty")], "no image files")]:
        with pytest.raises(SystemExit, match=message):
            benchmark.main(["--model", "alt_gvt_micro", "--runs", "1", *option])


def test_cpu_peak_memory_runs_in_a_fresh_process():
    cfg = Config("pcpvt_micro", 2, 32, "fp32", "train")
    memory = benchmark.peak_memory(cfg, "ours", None, torch.device("cpu"), seed=0, warmup=0)
    assert memory["peak"] >= memory["rss_before_step"] > 50 * 2 ** 20  # torch alone is larger


def test_each_implementation_runs_in_fresh_processes(tmp_path, monkeypatch):
    """With --isolate (the default) ours and timm's model are each timed in child processes of
    their own, alternating for --rounds rounds; the row that comes back merges their runs."""
    def parent_only(*args, **kwargs):
        raise AssertionError("run_config ran in the parent process")
    monkeypatch.setattr(benchmark, "run_config", parent_only)  # the spawned children import their own
    rows = benchmark.main(["--model", "pcpvt_small_v0", "--batch-size", "1", "--img-size", "32",
                           "--warmup", "0", "--runs", "2", "--rounds", "2", "--no-memory",
                           "--compare-timm", "--threads", "1", "--output-dir", str(tmp_path),
                           "--name", "isolated"])
    row = rows[0]
    assert row["config"]["model"] == "pcpvt_small_v0" and row["timed"] == ["ours", "timm"]
    for impl in ("ours", "timm"):
        assert len(row[impl]["timing"]["seconds"]) == 4  # 2 rounds x 2 runs
    assert row["max_logit_diff"] <= 1e-4
    assert row["ratio"]["of_medians"] == pytest.approx(
        row["ours"]["timing"]["median"] / row["timm"]["timing"]["median"])


def test_run_config_times_only_the_implementations_asked(monkeypatch):
    args = benchmark.parse_args(["--model", "pcpvt_small_v0", "--batch-size", "1", "--img-size", "32",
                                 "--warmup", "0", "--runs", "1", "--no-memory", "--compare-timm"])
    cfg = benchmark.configs_from_args(args)[0]
    part = benchmark.run_config(cfg, args, torch.device("cpu"), timed=("timm",), compare=False)
    assert part["timed"] == ["timm"] and "timing" in part["timm"] and part["ours"] == {}
    assert "max_logit_diff" not in part and "ratio" not in part


@pytest.mark.parametrize("compare, names, measured", [
    ("attention", ["flash", "native"], ["attention ops"]),
    ("attention-bf16", ["flash", "native"], ["attention ops"]),
    ("emulated-bf16", ["plain", "branches"], ["all ops", "kernels"]),
    ("pool", ["fresh", "pooled"], ["all ops", "kernels"]),
    ("onednn", ["sgemm", "onednn"], ["all ops", "kernels"])])
def test_inference_ab_tool_times_both_settings(compare, names, measured):
    """tools/inference_ab.py: each setting's steps, their ratio, and (profiled) the time in the
    operators it reports, which both settings run (7 x 7 windows: 56 pixels, stride 4 and 8)."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "tools" / "inference_ab.py"), "--compare",
                          compare, "--model", "alt_gvt_micro", "--img-size", "56",
                          "--batch-size", "2", "--rounds", "2", "--profile"],
                         check=True, text=True, capture_output=True, timeout=300).stdout
    lines = [line for line in out.splitlines()
             if not line.startswith(("native kernels ", "this CPU has AMX"))]
    precision = {"emulated-bf16": "bf16 (emulated)", "attention-bf16": "bf16"}.get(compare, "fp32")
    assert lines[0].startswith(f"alt_gvt_micro inference {precision}, batch 2, 56px, "
                               "2 alternating rounds")
    for name, line in zip(names, lines[1:3]):
        words = line.split()
        assert words[0] == name and float(words[1]) > 0 and words[2] == "img/s"
        assert float(line.split(" MiB faulted")[0].split()[-1]) >= 0
        ms = [float(line.split(f"{key} ")[1].split()[0]) for key in measured]
        assert all(m > 0 for m in ms) and ms == sorted(ms, reverse=True)  # kernels <= all ops
    ratio = float(lines[3].split(f"{names[1]} / {names[0]}: ")[1].split()[0])
    assert 0 < ratio < 100
