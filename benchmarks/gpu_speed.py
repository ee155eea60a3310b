"""The worker against the stock diffusers pipeline at real size, on one GPU, in one run.

    python3 benchmarks/gpu_speed.py --scenarios lightning1024,batch512,cfg1024 --out $OUT
    python3 benchmarks/gpu_speed.py --profile bf16,fp8 --out $OUT     # where a forward's time goes

Builds Qwen-Image-Edit-2509 at real size with random weights (`real_size.build_pipeline`:
timing does not depend on the weights' values).

For each scenario, the same list of jobs runs through
  A: `QwenImageEditPlusPipeline.__call__`, one job at a time (decode the input, call,
     encode a PNG): what a worker built on the stock pipeline does;
  B: this worker's `EditService` (validation, decoding, the batcher, the engine, PNG
     encoding) with every job submitted at once, as RunPod's concurrency delivers them,
     under each variant asked for (eager, compiled, ...), after untimed passes over the
     same jobs (`--warm-passes`: compilation, and the batcher learning what batches cost).
It reports images/s, p50/p95 latency, peak GPU memory and B/A, checks that each
variant's output stays within bf16 tolerance of the eager engine on the same weights,
and prints a markdown table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_size import PROMPTS, build_pipeline, input_png, random_transformer  # noqa: E402 - the shared builder

from config import Settings  # noqa: E402
from model_loader import LIGHTNING_SCHEDULER_CONFIG, LoadedModel  # noqa: E402
from qwen_edit_worker.engine import (
    compilation,  # noqa: E402
    flash_attention,  # noqa: E402
    fp8,  # noqa: E402
    rope_attention,  # noqa: E402
)
from qwen_edit_worker.engine.edit_engine import EditEngine, EditRequest  # noqa: E402
from qwen_edit_worker.jobs.images import encode_image, load_images  # noqa: E402
from qwen_edit_worker.service import EditService  # noqa: E402
from qwen_edit_worker.testing.tiny_model import build_tiny_pipeline  # noqa: E402

# Qwen-Image-Edit's own scheduler configuration (used without Lightning).
BASE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}  # fmt: skip

SCENARIOS = {
    # name: (output side, jobs, steps, cfg scale, lightning, precision)
    "lightning1024": (1024, 4, 8, 1.0, True, "bf16"),
    "batch512": (512, 8, 8, 1.0, True, "bf16"),
    "cfg1024": (1024, 2, 40, 4.0, False, "bf16"),
    "4bit1024": (1024, 2, 8, 1.0, True, "4bit"),
    "queue8": (1024, 8, 8, 1.0, True, "bf16"),  # 8 jobs queued at once: replicas' throughput
    "small256": (256, 16, 8, 1.0, True, "bf16"),  # 256² outputs of 256² references: where batching pays
}
# REFERENCE_IMAGE_AREA of a scenario, where it is not the default 1024² (the stock pipeline's too).
REFERENCE_AREA = {"small256": 256 * 256}


DEVICE, DTYPE, INPUT_SIDE = torch.device("cuda"), torch.bfloat16, 1024
WARM_PASSES = 2
QUEUE_AT_START = False  # --queue-at-start: RunPod's scale-up, the jobs already waiting when the worker starts


class Preloaded:
    def __init__(self, model: LoadedModel):
        self.model = model

    def get(self) -> LoadedModel:
        return self.model


def quantize_nf4(pipe) -> None:
    """NF4 as the `4bit` mode loads it (bitsandbytes Linear4bit, block 0's img_mod kept)."""
    import bitsandbytes as bnb

    for name in ("transformer", "text_encoder"):
        root = getattr(pipe, name)
        for module_name, module in list(root.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{module_name}.{child_name}" if module_name else child_name
                if not isinstance(child, torch.nn.Linear) or full.startswith("transformer_blocks.0.img_mod"):
                    continue
                if name == "text_encoder" and full.endswith("lm_head"):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")  # fmt: skip
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4").to("cuda")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q)
        torch.cuda.empty_cache()


def jobs_for(name: str) -> list[dict]:
    side, count, steps, cfg, _, _ = SCENARIOS[name]
    return [
        {"id": f"{name}-{i}", "input": {"prompt": PROMPTS[i % len(PROMPTS)], "image_base64": input_png(INPUT_SIDE, i),
                                        "width": side, "height": side, "num_inference_steps": steps,
                                        "true_cfg_scale": cfg, "seed": i}}  # fmt: skip
        for i in range(count)
    ]


def stock_one_at_a_time(pipe, jobs: list[dict], settings: Settings) -> tuple[float, list[float]]:
    start, latencies = time.perf_counter(), []
    for job in jobs:
        x = job["input"]
        (image,) = load_images([x["image_base64"]], settings)
        extra = {"negative_prompt": " "} if x["true_cfg_scale"] > 1 else {}
        out = pipe(image=[image], prompt=x["prompt"], true_cfg_scale=x["true_cfg_scale"], width=x["width"],
                   height=x["height"], num_inference_steps=x["num_inference_steps"],
                   generator=torch.Generator().manual_seed(x["seed"]), output_type="np", **extra).images  # fmt: skip
        encode_image(out[0], "png", 95)
        latencies.append(time.perf_counter() - start)
    return time.perf_counter() - start, latencies


def worker_all_at_once(service: EditService, jobs: list[dict]) -> tuple[float, list[float], list[dict]]:
    """Wall time, each job's latency, and each job's response (batch size, stage timings)."""

    async def scenario():
        start = time.perf_counter()
        latencies: list[float] = []

        async def one(job):
            result = await service.handle(job)
            assert "error" not in result, result["error"]
            latencies.append(time.perf_counter() - start)
            return result

        results = await asyncio.gather(*(one(job) for job in jobs))
        return time.perf_counter() - start, latencies, list(results)

    return asyncio.run(scenario())


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def engine_image(settings: Settings, model: LoadedModel, job: dict) -> np.ndarray:
    x = job["input"]
    (image,) = load_images([x["image_base64"]], settings)
    request = EditRequest(prompt=x["prompt"], images=(image,), seed=x["seed"], num_inference_steps=x["num_inference_steps"],
                          true_cfg_scale=x["true_cfg_scale"], negative_prompt=None, width=x["width"], height=x["height"])  # fmt: skip
    return EditEngine(settings, lambda: model).run_batch([request])[0].images[0]


def reset_peak() -> None:
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)
        torch.cuda.reset_peak_memory_stats(index)


def peak_gib() -> float:
    """The highest peak of any GPU (with replicas, each holds a whole pipeline)."""
    return max((torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())), default=0.0)


def job_timeline(results: list[dict]) -> list[str]:
    """Each job's end (s after all were submitted) and where its time went, in ms: fetch, waiting
    for a GPU lane, the engine's encode / denoise / decode, and the reply (PNG encode)."""
    rows = []
    for r in results:
        t = r["timings_ms"]
        engine = t["encode"] + t["denoise"] + t["decode"]
        rows.append((t["total"], f"{t['total'] / 1000:.2f}s: fetch {t['fetch']:.0f} wait {t['queue_and_gpu'] - engine:.0f} "
                                 f"enc {t['encode']:.0f} den {t['denoise']:.0f} dec {t['decode']:.0f} "
                                 f"reply {t['total'] - t['fetch'] - t['queue_and_gpu']:.0f}"))  # fmt: skip
    return [row for _, row in sorted(rows)]


def run_variant(variant, name, pipe, models, settings, jobs, warm, count, reference_images) -> dict:
    model = models[0]
    if variant == "stock":
        stock_one_at_a_time(pipe, [warm], settings)
        reset_peak()
        elapsed, latencies = stock_one_at_a_time(pipe, jobs, settings)
        sizes, error, stages = [1] * count, None, {}
        reference_images[name] = engine_image(settings, model, jobs[0])
    else:
        service = EditService(settings, replicas=[Preloaded(m) for m in models])
        warm_start = time.perf_counter()
        if not QUEUE_AT_START:  # else the jobs are queued while the start-up warm-up runs, timed from now
            service.started.wait()  # as a worker that has finished its start-up (compiled ones: warmed up)
            print(f"  {variant} {name}: start-up warm-up took {time.perf_counter() - warm_start:.0f} s", flush=True)
        # Untimed passes: compilation, then the batcher measuring one job alone and the batch
        # sizes it tries, so that the timed pass runs on what was learned, as a worker that
        # has been up for a while does.
        for round_ in range(0 if QUEUE_AT_START else WARM_PASSES):
            _, _, results = worker_all_at_once(service, [dict(j, id=f"warm-{round_}-{k}") for k, j in enumerate(jobs)])
            print(f"  {variant} {name}: warm pass {round_ + 1}, each job's batch size: {[r['batch_size'] for r in results]}", flush=True)
        print(f"  {variant} {name}: warm-up (compile, cost learning) took {time.perf_counter() - warm_start:.0f} s", flush=True)
        reset_peak()
        elapsed, latencies, results = worker_all_at_once(service, jobs)
        sizes = [r["batch_size"] for r in results]
        print(f"  {variant} {name}: timed pass, each job's batch size: {sizes}", flush=True)
        stages = {s: statistics.median(r["timings_ms"][s] for r in results) for s in ("encode", "denoise", "decode")}
        stages["denoise_max"] = max(r["timings_ms"]["denoise"] for r in results)  # a job that waited for a compile shows here
        print(f"  {variant} {name}: each job (by end): {job_timeline(results)}", flush=True)
        service.close()
        error = relative_error(engine_image(settings, model, jobs[0]), reference_images[name])
    peak = peak_gib()
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"scenario": name, "variant": variant, "images_per_s": count / elapsed, "p50_s": statistics.median(latencies),
            "p95_s": q[18], "peak_gib": peak, "mean_batch": statistics.mean(sizes), "rel_error_vs_eager": error,
            "stage_ms": stages, "steps": jobs[0]["input"]["num_inference_steps"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", default="lightning1024,batch512,cfg1024")
    parser.add_argument("--attention", default="auto", help="ATTENTION_BACKEND of B's variants but cudnn ones: auto "
                        "(FlashAttention-3 on a Hopper GPU, as the worker by default), native (PyTorch's SDPA), fa3")  # fmt: skip
    parser.add_argument("--variants", default="eager,compiled", help="B variants, in this order: eager, eager-alone (MAX_BATCH_SIZE=1), compiled, compiled-alone, cfgbatch, replicas (compiled, one job at a time on each visible GPU), fp8, fp8-alone, cudnn, cudnn-alone (cuDNN attention; compiled if a compiled variant came first)")
    parser.add_argument("--out", default=".")
    parser.add_argument("--tiny", action="store_true", help="smoke-test this script on CPU with the tiny model")
    parser.add_argument("--warm-passes", type=int, default=2, help="untimed passes over the jobs before B is timed")
    parser.add_argument("--queue-at-start", action="store_true",
                        help="RunPod's scale-up: B's jobs are queued as the service starts (its start-up warm-up timed "
                             "in, no warm passes); the model is loaded before, as a kept page cache would have it")
    parser.add_argument("--profile", help=f"instead: profile one compiled forward per variant ({', '.join(PROFILE_VARIANTS)}; "
                                          "with -dynamic, the text and image lengths symbolic, as the worker compiles them)")
    parser.add_argument("--profile-text", type=int, default=200, help="prompt tokens of the profiled forward")
    parser.add_argument("--stages", type=int, help="instead: cProfile the encode and decode stages over this many jobs")
    args = parser.parse_args()
    if args.stages:
        profile_stages(args.stages, args.tiny, args.out)
        return
    if args.profile:
        profile_forwards(args.profile.split(","), args.profile_text, args.tiny, args.out)
        return
    global WARM_PASSES, QUEUE_AT_START
    WARM_PASSES, QUEUE_AT_START = args.warm_passes, args.queue_at_start
    scenarios = args.scenarios.split(",")
    variants = args.variants.split(",")
    # Compiling, fp8 and cuDNN attention change the shared pipeline for good, so they come last.
    stage = [3 if v.startswith("cudnn") else 2 if v.startswith("fp8") else 1 if v.startswith(("compiled", "cfgbatch", "replicas")) else 0
             for v in variants]  # fmt: skip
    if stage != sorted(stage):
        parser.error("list variants in this order: eager ones, compiled and cfgbatch, fp8, cudnn")
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as stock_module
    from diffusers import FlowMatchEulerDiscreteScheduler

    if args.tiny:
        from qwen_edit_worker.testing.tiny_model import build_tiny_pipeline

        global DEVICE, DTYPE, INPUT_SIDE
        DEVICE, DTYPE, INPUT_SIDE = torch.device("cpu"), torch.float32, 64
        for name, (side, *rest) in list(SCENARIOS.items()):
            SCENARIOS[name] = (max(64, side // 16), *rest)
        stock_module.VAE_IMAGE_SIZE = 64 * 64
        pipe = build_tiny_pipeline()
        pipe.set_progress_bar_config(disable=True)
    else:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
        pipe = build_pipeline()
    if any(SCENARIOS[s][5] == "4bit" for s in scenarios):
        quantize_nf4(pipe)
        print(f"quantized to NF4: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
    base_env = {"MODEL_ID": "tiny-random" if args.tiny else "real-size-random", "MAX_BATCH_SIZE": "8", "MAX_CONCURRENCY": "16",
                "BATCH_WAIT_MS": "50", "MODEL_DIR": str(Path(args.out) / "models") if args.tiny else "/tmp/gpu-speed-models"}  # fmt: skip
    rows, reference_images = [], {}
    compiled = quantized = False
    replicas = [pipe]  # more, one per further GPU, when the replicas variant first runs
    for variant in ["stock", *variants]:
        attention = "_native_cudnn" if variant.startswith("cudnn") else args.attention
        if variant != "stock":
            rope_attention.install(pipe.transformer)  # the loader's step (once); A keeps diffusers' processor
            flash_attention.use(pipe.transformer, attention, DEVICE, DTYPE)  # the loader's choice, logged
        if variant.startswith("fp8") and not quantized:
            fp8.quantize(pipe.transformer)  # the production loader's own fp8 step
            print(f"transformer in fp8: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
            quantized = True
        if variant.startswith(("compiled", "cfgbatch", "fp8", "replicas")) and not compiled:
            compilation.compile_transformer(pipe, Settings.from_env(base_env))  # as the worker's loader compiles
            compiled = True
        if variant == "replicas" and len(replicas) == 1:
            for index in range(1, torch.cuda.device_count()):
                replica = build_pipeline(torch.device("cuda", index))  # the same seed: the same weights
                rope_attention.install(replica.transformer)
                flash_attention.use(replica.transformer, attention, replica.transformer.device, DTYPE)
                compilation.compile_transformer(replica, Settings.from_env(base_env))
                replicas.append(replica)
        env = dict(base_env, CFG_BATCHING=str(variant == "cfgbatch"),
                   MAX_BATCH_SIZE="1" if variant.endswith("-alone") or variant == "replicas" else base_env["MAX_BATCH_SIZE"],
                   ATTENTION_BACKEND=attention)  # fmt: skip
        if variant.startswith("cudnn"):
            pipe.transformer.set_attention_backend("_native_cudnn")
        for name in scenarios:
            side, count, steps, cfg, lightning, precision = SCENARIOS[name]
            area = REFERENCE_AREA.get(name, 1024 * 1024)
            settings = Settings.from_env(env if args.tiny else dict(env, REFERENCE_IMAGE_AREA=str(area)))
            if not args.tiny:
                stock_module.VAE_IMAGE_SIZE = area  # the stock pipeline's reference size, alike
            lanes = replicas if variant == "replicas" else [pipe]
            models = []
            for lane in lanes:
                lane.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                    LIGHTNING_SCHEDULER_CONFIG if lightning else BASE_SCHEDULER_CONFIG
                )
                device = next(lane.transformer.parameters()).device
                # Compiled variants warm up at start, as the worker does (`EditService` waits for it).
                models.append(LoadedModel(lane, device, DTYPE, precision, lightning, "none", compiled=compiled))
            jobs = jobs_for(name)
            warm = dict(jobs[0], id="warm")
            try:
                row = run_variant(variant, name, pipe, models, settings, jobs, warm, count, reference_images)
            except Exception as error:  # one variant failing must not cost the rest of the run
                print(f"{variant} {name} FAILED: {type(error).__name__}: {str(error)[:500]}", flush=True)
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
            (Path(args.out) / "gpu_speed.json").write_text(json.dumps(rows, indent=1))

    stock = {r["scenario"]: r["images_per_s"] for r in rows if r["variant"] == "stock"}
    print("\n| scenario | variant | images/s | p50 s | p95 s | peak GiB | jobs per batch | B/A | rel. error vs eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        err = "-" if r["rel_error_vs_eager"] is None else f"{r['rel_error_vs_eager']:.1e}"
        print(f"| {r['scenario']} | {r['variant']} | {r['images_per_s']:.3f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
              f"{r['peak_gib']:.1f} | {r['mean_batch']:.1f} | {r['images_per_s'] / stock.get(r['scenario'], math.nan):.2f} | {err} |")  # fmt: skip
    print("\nStages of B's timed pass (median over jobs, per GPU batch, the GPU synchronised at each boundary):\n")
    print("| scenario | variant | encode ms | denoise ms (median / longest) | ms per transformer forward | decode ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["stage_ms"]:
            st, passes = r["stage_ms"], r["steps"] * (2 if SCENARIOS[r["scenario"]][3] > 1 else 1)
            print(f"| {r['scenario']} | {r['variant']} | {st['encode']:.0f} | {st['denoise']:.0f} / {st['denoise_max']:.0f} | "
                  f"{st['denoise'] / passes:.0f} | {st['decode']:.0f} |")  # fmt: skip


# --profile variants: (linears of the blocks kept in bf16, or None for no fp8; real-valued RoPE; FlashAttention-3).
PROFILE_VARIANTS = {
    "bf16-complex": (None, False, False),  # diffusers' own attention processor (complex-number RoPE)
    "bf16": (None, True, False),  # the worker with ATTENTION_BACKEND=native (PyTorch's SDPA)
    "bf16+fa3": (None, True, True),  # the worker on a Hopper GPU (ATTENTION_BACKEND=auto: FlashAttention-3)
    "fp8-all": ((), True, False),  # every linear of the blocks in fp8 (the worker before the recipe)
    "fp8": (fp8.KEPT_IN_BF16, True, False),  # the recipe, with SDPA
    "fp8+fa3": (fp8.KEPT_IN_BF16, True, True),  # the recipe with FlashAttention-3
    "fp8+mod": (tuple(k for k in fp8.KEPT_IN_BF16 if not k.endswith("_mod.1")), True, False),  # and the modulation layers
    "fp8+mlp2": (tuple(k for k in fp8.KEPT_IN_BF16 if k != ".img_mlp.net.2"), True, False),  # and img_mlp.net.2 in fp8 too
}


def profile_forwards(variants: list[str], text: int, tiny: bool, out: str) -> None:
    """Where a compiled forward's time goes (`forward_profile`), for each variant in turn, each
    on a fresh transformer with the same random weights; the relative error of its output
    against the eager bf16 forward of diffusers' own transformer on the same inputs."""
    import forward_profile

    unknown = {v.removesuffix("-dynamic") for v in variants} - set(PROFILE_VARIANTS)
    if unknown:
        raise SystemExit(f"--profile takes {', '.join(PROFILE_VARIANTS)}; not {', '.join(sorted(unknown))}")
    device = torch.device("cpu" if tiny else "cuda")
    dtype, side = (torch.float32, 4) if tiny else (torch.bfloat16, 64)  # 64² patches: 1024² output and reference
    if not tiny:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)

    transformer = random_transformer(device, dtype, tiny)
    inputs = forward_profile.forward_inputs(transformer, side, text, device, dtype)
    with torch.inference_mode():
        reference = transformer(**inputs)[0].float().cpu()
    summaries = {}
    for variant in variants:
        kept, real_rope, flash = PROFILE_VARIANTS[variant.removesuffix("-dynamic")]
        del transformer
        torch._dynamo.reset()
        if not tiny:
            torch.cuda.empty_cache()
        transformer = random_transformer(device, dtype, tiny)
        if real_rope:
            rope_attention.install(transformer)
            if flash:
                flash_attention.use(transformer, "fa3", device, dtype)  # raises where FA3 cannot run
        if kept is not None:
            fp8.quantize(transformer, kept)
        transformer.compile_repeated_blocks(fullgraph=True)
        if variant.endswith("-dynamic"):  # the worker's graph: text and image lengths symbolic
            compilation.sequences_dynamic(transformer)
        start = time.perf_counter()
        with torch.inference_mode():
            output = transformer(**inputs)[0].float().cpu()
        compile_s = time.perf_counter() - start
        summary = forward_profile.profile(transformer, side_patches=side, text=text)
        summary.update(compile_s=compile_s, rel_error=float((output - reference).norm() / reference.norm()))
        summaries[variant] = summary
        print(forward_profile.markdown(f"{variant} compiled forward", summary), flush=True)
        print(f"first forward (compile) {compile_s:.1f} s; output vs eager bf16: relative error {summary['rel_error']:.2e}", flush=True)
        (Path(out) / "forward_profile.json").write_text(json.dumps(summaries, indent=1))
    print("\n| variant | ms of kernels per forward | matmul | attention | quantization | other | compile s | rel. error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant, s in summaries.items():
        ms = s["ms"]
        print(f"| {variant} | {s['ms_per_forward']:.1f} | {ms['matmul']:.1f} | {ms['attention']:.1f} | "
              f"{ms['quantization']:.1f} | {ms['other']:.1f} | {s['compile_s']:.0f} | {s['rel_error']:.1e} |")  # fmt: skip


def profile_stages(jobs: int, tiny: bool, out: str) -> None:
    """Where the encode and decode stages of one 1024² job go, host side: cProfile over the
    engine's own `_encode` and `_decode` (the GPU waited for at the end of each), after a
    warm-up job; the 30 functions with the most cumulative time, per stage."""
    import cProfile
    import pstats

    pipe = build_tiny_pipeline() if tiny else build_pipeline()
    settings = Settings.from_env({"MODEL_ID": "tiny-random" if tiny else "real-size-random"})
    device = torch.device("cpu" if tiny else "cuda")
    model = LoadedModel(pipe, device, torch.float32 if tiny else torch.bfloat16, "bf16", True, "none")
    engine = EditEngine(settings, lambda: model)
    side = 64 if tiny else 1024
    requests = [EditRequest(prompt=PROMPTS[k % len(PROMPTS)], images=(load_images([input_png(side, k)], settings)[0],),
                            seed=k, num_inference_steps=1, true_cfg_scale=1.0, width=side, height=side)
                for k in range(jobs + 1)]  # fmt: skip
    engine.run_batch(requests[:1])  # warm-up: first calls, caches
    for stage in ("encode", "decode"):
        profiler = cProfile.Profile()
        with torch.inference_mode():
            plan = engine.plan(requests[1])
            latents = pipe.prepare_latents(None, 1, pipe.transformer.config.in_channels // 4, plan.height, plan.width,
                                           torch.bfloat16, device, torch.Generator().manual_seed(0))[0]  # fmt: skip
            start = time.perf_counter()
            for request in requests[1:]:
                profiler.enable()
                engine._encode(pipe, request, plan, device, model.dtype) if stage == "encode" else engine._decode(pipe, latents, plan)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                profiler.disable()
        print(f"\n{stage}: {(time.perf_counter() - start) / jobs * 1000:.0f} ms per job (host view, GPU waited for)", flush=True)
        stats = pstats.Stats(profiler).strip_dirs().sort_stats("cumulative")
        stats.print_stats(30)
        stats.dump_stats(str(Path(out) / f"{stage}.pstats"))


if __name__ == "__main__":
    main()
