"""A new worker's cold start at real size: each stage's end, and the raw read of the same files.

    python3 benchmarks/cold_start.py --dir /tmp/cold --runs bf16/empty/3,bf16/warm/3,fp8/empty/0 [--importtime]
    python3 benchmarks/cold_start.py --dir /tmp/cold --runs bf16/warm/3/queue16,bf16/warm/3/queue16/alone,stock/-/0/queue16
        [--gpu-parallelism single]   # the default: one GPU, whatever the machine has; auto: as a worker

Once per --dir: builds the real-size pipeline with random weights (`gpu_speed.build_pipeline`),
saves it with `save_pretrained` (what a downloaded model is on disk), and writes a rank-64
Lightning-format LoRA over the transformer's 720 linear layers into MODEL_DIR in
huggingface_hub's cache layout, where the worker finds a downloaded Lightning file.
It lists the start-up's files as the image's build does (`qwen_edit_worker.startup.import_set`; --no-import-set
removes the list instead, as outside the image). Then it drops the page cache and reads the
weights raw (the floor: no start can load the weights faster than the disk gives them), and
for each run PRECISION/CACHE/MAX_LORAS
(cache `empty`: MODEL_DIR's inductor cache removed; `warm`: as the previous run left it; a
further fields: `stand-in` sets COMPILE_WHILE_LOADING=true, `parallel` diffusers'
HF_ENABLE_PARALLEL_LOADING=yes, which reads a model's shards on several threads) drops
the page cache again and starts a fresh process that does what a worker does: imports, builds
`EditService` (which loads the model, fuses Lightning, compiles and warms up), then answers
one 1024² Lightning-8 edit. Further fields: `queue16` (any count) starts the worker while 16 such
jobs already wait, as RunPod's scale-up does, and reports each job's latency, batch size and
denoise time; `alone` sets MAX_BATCH_SIZE=1 (otherwise the worker's default); precision `stock`
loads the saved pipeline with diffusers' own `from_pretrained`, loads and fuses the Lightning
file with `load_lora_weights` and runs the jobs one after another. The child prints the worker's own start-up log lines with the
seconds since its process started, the time to the first result, and the files it imported
or mapped that the list does not name. The last lines are a markdown table. With --importtime each child runs under `python -X importtime` and the
slowest imports (cumulative, by top-level package) are printed with its result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwen_edit_worker.startup import prefetch  # noqa: E402

LIGHTNING_REPO = "lightx2v/Qwen-Image-Lightning"
REVISION = "0" * 40


def prepare(folder: Path) -> None:
    """The saved pipeline and the Lightning file, once."""
    import torch
    from real_size import build_pipeline

    from config import default_lightning_weight
    from qwen_edit_worker.testing.tiny_model import lightning_format_lora

    if (folder / "model" / "model_index.json").exists():
        return
    from safetensors.torch import save_file

    pipe = build_pipeline()
    start = time.perf_counter()
    pipe.save_pretrained(folder / "model")
    print(f"saved the pipeline in {time.perf_counter() - start:.0f} s", flush=True)
    repo = folder / "volume" / f"models--{LIGHTNING_REPO.replace('/', '--')}"
    target = repo / "snapshots" / REVISION / default_lightning_weight(8)
    target.parent.mkdir(parents=True)
    save_file(lightning_format_lora(pipe.transformer, rank=64, alpha=8.0, seed=0, std=0.01), str(target))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    del pipe
    torch.cuda.empty_cache()


def weight_files(folder: Path) -> list[Path]:
    return sorted([*(folder / "model").rglob("*.safetensors"), *(folder / "volume").rglob("*.safetensors")])


def drop_page_cache(files: list[Path]) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for file in files:
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)
        return "fadvise(DONTNEED)"


def raw_read(files: list[Path]) -> tuple[float, float]:
    """Seconds and GB/s to read every byte once, in large reads (the disk's fastest)."""
    start = time.perf_counter()
    total = prefetch.read_all(files, chunk=16 << 20)
    seconds = time.perf_counter() - start
    return seconds, total / seconds / 1e9


def child() -> None:
    """One worker start, as RunPod runs it, up to its first result."""
    records: list[tuple[float, str]] = []

    from qwen_edit_worker.startup import startup_clock

    class Stages(logging.Handler):
        def emit(self, record):
            records.append((round(startup_clock.seconds_since_start(), 1), record.getMessage()[:160]))

    logging.basicConfig(level=logging.WARNING)
    worker_log = logging.getLogger("qwen_edit_worker")  # the worker's loggers, prefetch's included
    worker_log.setLevel(logging.INFO)
    worker_log.addHandler(Stages())
    # What handler.py does before serving (runpod itself is not installed on the GPU machine):
    # the prefetch starts before torch is imported.
    from config import Settings
    from qwen_edit_worker.startup import model_files, prefetch

    settings = Settings.from_env()
    prefetch.start(model_files.local_model_path(settings), model_files.local_lora_path(settings))
    records.append((round(startup_clock.seconds_since_start(), 1), "prefetch started"))
    import asyncio

    from qwen_edit_worker.engine import compilation

    compilation.start_workers(settings)
    from qwen_edit_worker.service import EditService

    startup_clock.mark("imports done")
    prefetch.imports_done()
    service = EditService(settings)  # starts loading; RunPod hands it jobs from now on
    queued = int(os.environ.get("COLD_START_QUEUE", "1"))
    answers = asyncio.run(waiting_jobs(service, queued, settings.max_concurrency))
    first = min(seconds for seconds, _ in answers)
    print("RESULT " + json.dumps({"first_result_s": round(first, 1), "error": answers[0][1].get("error"),
                                  "job_timings_ms": answers[0][1].get("timings_ms"), "stages": records,
                                  "queue": queue_summary(answers) if queued > 1 else None,
                                  "outside_import_set": outside_import_set()}), flush=True)  # fmt: skip
    os._exit(0)


def cold_job(index: int) -> dict:
    from real_size import PROMPTS, input_png

    # Steps and CFG scale spelled out (the worker's Lightning-8 defaults) so the stock pipeline runs the same jobs.
    return {"id": f"cold-{index}", "input": {"prompt": PROMPTS[index % len(PROMPTS)], "image_base64": input_png(1024, index),
                                             "width": 1024, "height": 1024, "seed": index, "num_inference_steps": 8,
                                             "true_cfg_scale": 1.0}}  # fmt: skip


async def waiting_jobs(service, count: int, concurrency: int) -> list[tuple[float, dict]]:
    """`count` jobs waiting from the process's start, handed over at most `concurrency` at a
    time as RunPod's JobScaler does; each answer with the second it came."""
    import asyncio

    from qwen_edit_worker.startup import startup_clock

    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> tuple[float, dict]:
        async with slots:
            answer = await service.handle(cold_job(index))
        return startup_clock.seconds_since_start(), answer

    return list(await asyncio.gather(*(one(index) for index in range(count))))


def queue_summary(answers: list[tuple[float, dict]]) -> dict:
    """The scale-up's figures: latency counts from the process's start (the jobs were waiting)."""
    import statistics

    seconds = sorted(s for s, _ in answers)
    denoise = [a["timings_ms"]["denoise"] for _, a in answers if "timings_ms" in a]
    steady = statistics.median(denoise) if denoise else None  # a job that waited for a compile stands out above it
    return {"jobs": len(answers), "errors": sum("error" in a for _, a in answers),
            "p50_s": round(statistics.median(seconds), 1), "p95_s": round(seconds[int(0.95 * (len(seconds) - 1))], 1),
            "last_s": round(seconds[-1], 1), "images_per_s_after_first": round((len(seconds) - 1) / (seconds[-1] - seconds[0]), 3)
            if len(seconds) > 1 and seconds[-1] > seconds[0] else None,
            "batch_sizes": [a.get("batch_size") for _, a in sorted(answers, key=lambda x: x[0])],
            "denoise_ms_longest": max(denoise, default=None), "denoise_ms_steady": steady}  # fmt: skip


def stock_child() -> None:
    """The stock diffusers pipeline started cold on the same files: from_pretrained, the Lightning
    file through load_lora_weights and fuse_lora, then the waiting jobs one after another."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    from gpu_speed import LIGHTNING_SCHEDULER_CONFIG, stock_one_at_a_time

    from config import Settings
    from qwen_edit_worker.startup import startup_clock

    settings = Settings.from_env({**os.environ, "PRECISION_MODE": "bf16"})  # for reading the input images
    folder = Path(os.environ["MODEL_DIR"])
    pipe = QwenImageEditPlusPipeline.from_pretrained(os.environ["MODEL_ID"], torch_dtype=torch.bfloat16).to("cuda")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
    (lightning,) = folder.rglob("*Lightning*.safetensors")
    pipe.load_lora_weights(str(lightning))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    loaded = startup_clock.seconds_since_start()
    jobs = [cold_job(i) for i in range(int(os.environ.get("COLD_START_QUEUE", "1")))]
    _, latencies = stock_one_at_a_time(pipe, jobs, settings)
    answers = [(loaded + s, {}) for s in latencies]
    print("RESULT " + json.dumps({"first_result_s": round(answers[0][0], 1), "error": None, "job_timings_ms": None,
                                  "stages": [(round(loaded, 1), "pipeline loaded, Lightning fused")],
                                  "queue": queue_summary(answers) if len(answers) > 1 else None,
                                  "outside_import_set": None}), flush=True)  # fmt: skip
    os._exit(0)


def outside_import_set() -> dict | None:
    """The files this start-up imported or mapped that the image's list (`import_set`) does
    not name: what the prefetch did not read ahead. None without a list."""
    from qwen_edit_worker.startup import import_set

    listed = set(prefetch.listed_files(prefetch.IMPORT_SET))
    if not listed:
        return None
    files = set(import_set.files_read()) - listed
    return {"files": len(files), "MB": round(sum(os.path.getsize(f) for f in files) / 1e6, 1),
            "largest": sorted(files, key=os.path.getsize)[-5:]}  # fmt: skip


def record_import_set() -> None:
    """List the start-up's files as the image's build does (`python -m qwen_edit_worker.startup.import_set`)."""
    done = subprocess.run([sys.executable, "-m", "qwen_edit_worker.startup.import_set"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    print(done.stdout.strip() or f"import set not recorded: {done.stderr[-500:]}", flush=True)


def slowest_imports(importtime_log: str, top: int = 12) -> list[tuple[str, float]]:
    """Packages by the cumulative time of their first import (what they pulled in included, so
    the figures overlap), from `python -X importtime`'s lines."""
    totals = []
    for line in importtime_log.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if "." not in name.strip():
            totals.append((name.strip(), round(int(cumulative) / 1e6, 2)))
    return sorted(totals, key=lambda item: -item[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--runs", default="bf16/empty/3,bf16/warm/3",
                        help="PRECISION/CACHE/MAX_LORAS[/stand-in][/parallel], comma-separated (stand-in: COMPILE_WHILE_LOADING=true, "
                             "parallel: HF_ENABLE_PARALLEL_LOADING=yes)")
    parser.add_argument("--gpu-parallelism", default="single",
                        help="GPU_PARALLELISM of the started workers (auto on several GPUs starts replicas)")
    parser.add_argument("--importtime", action="store_true", help="report each start's slowest imports")
    parser.add_argument("--no-import-set", action="store_true",
                        help="start without the image's list of the start-up's files (the prefetch then paces its reads)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stock_child() if os.environ.get("PRECISION_MODE") == "stock" else child()
        return
    folder = Path(args.dir)
    prepare(folder)
    if args.no_import_set:
        prefetch.IMPORT_SET.unlink(missing_ok=True)
    else:
        record_import_set()
    files = weight_files(folder)
    size = sum(file.stat().st_size for file in files) / 1e9
    how = drop_page_cache(files)
    read_s, speed = raw_read(files)
    print(f"raw read of {size:.1f} GB after {how}: {read_s:.1f} s ({speed:.2f} GB/s)", flush=True)
    rows = []
    for run in args.runs.split(","):
        precision, cache, max_loras, *more = run.split("/")
        if cache == "empty":
            shutil.rmtree(folder / "volume" / "torchinductor", ignore_errors=True)
        drop_page_cache(files)
        queued = next((int(field[5:]) for field in more if field.startswith("queue")), 1)
        env = {**os.environ, "MODEL_ID": str(folder / "model"), "MODEL_DIR": str(folder / "volume"),
               "PRECISION_MODE": precision, "MAX_LORAS": max_loras, "COLD_START_QUEUE": str(queued),
               **({"MAX_BATCH_SIZE": "1"} if "alone" in more else {}),
               "GPU_PARALLELISM": args.gpu_parallelism, "COMPILE_WHILE_LOADING": str("stand-in" in more).lower(),
               "HF_ENABLE_PARALLEL_LOADING": "yes" if "parallel" in more else "no"}  # fmt: skip
        python = [sys.executable, "-X", "importtime"] if args.importtime else [sys.executable]
        done = subprocess.run([*python, __file__, "--dir", args.dir, "--child"], env=env, capture_output=True,
                              text=True, timeout=560)  # fmt: skip
        if args.importtime:
            print(json.dumps({"run": run, "slowest_imports_s": slowest_imports(done.stderr)}), flush=True)
        lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(json.dumps({"run": run, "failed": done.stderr[-2000:]}), flush=True)
            continue
        result = json.loads(lines[0])
        print(json.dumps({"run": run, **result}), flush=True)
        rows.append((run, result))
    print(f"\n{size:.1f} GB read raw in {read_s:.1f} s ({speed:.2f} GB/s, page cache dropped by {how})\n")
    print("| precision / compile cache / MAX_LORAS | first 1024² result s | minus the raw read s |")
    print("| --- | --- | --- |")
    for run, result in rows:
        print(f"| {run} | {result['first_result_s']} | {result['first_result_s'] - read_s:.1f} |")
    queues = [(run, result["queue"]) for run, result in rows if result.get("queue")]
    if queues:
        print("\n| run | jobs waiting at start | first result s | p50 s | p95 s | last s | images/s after the first "
              "| batch sizes | denoise ms, longest / steady |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for run, q in queues:
            first = next(r["first_result_s"] for name, r in rows if name == run)
            print(f"| {run} | {q['jobs']} | {first} | {q['p50_s']} | {q['p95_s']} | {q['last_s']} | {q['images_per_s_after_first']} "
                  f"| {q['batch_sizes']} | {q['denoise_ms_longest']} / {q['denoise_ms_steady']} |")  # fmt: skip


if __name__ == "__main__":
    main()
