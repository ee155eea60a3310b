"""Regional torch.compile of the transformer, and the fall-back to eager when compiling fails.

Compiling needs a working toolchain at run time: inductor builds C++ kernels on a CPU, and
triton builds a small C launcher on a GPU (a C compiler and the Python headers). A worker
whose compile fails must still serve, eagerly: it logs one warning and carries on, rather
than retiring a worker whose replacement would fail the same way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator, TypeVar

import torch

from config import Settings, export_library_settings

log = logging.getLogger("qwen_edit_worker.compile")
RECOMPILE_LIMIT = 64
T = TypeVar("T")


def keep_the_fake_cuda_guard_alive() -> None:
    """On a machine without a GPU, torch's CUDA build gives dynamo a stand-in CUDA device guard
    the first time a thread traces (`torch._C._ensureCUDADeviceGuardSet`) and keeps it in that
    thread's thread-local storage while the process-wide registry points at it. When the thread
    ends, the registry is left pointing at freed memory, and the next trace on another thread
    crashes the process (a segmentation fault). The worker traces on threads that come and go
    (GPU lanes, idle warm-ups, services closed and made again), so the stand-in is made here,
    once, on the thread that imports this module: the main thread, which lives as long as the
    process. On a GPU, or on a CPU-only build of torch, there is nothing to do."""
    if torch.backends.cuda.is_built() and not torch.cuda.is_available():
        torch._C._ensureCUDADeviceGuardSet()


keep_the_fake_cuda_guard_alive()


def should_compile(settings: Settings, device: torch.device, bnb_quantized: bool, offload: str) -> bool:
    """COMPILE_TRANSFORMER=auto compiles where it was measured to pay (a GPU); true also on a CPU.
    bitsandbytes layers and offload hooks were never measured compiled: those stay eager."""
    if settings.compile_transformer is False:
        return False
    if settings.compile_transformer is None and device.type != "cuda":
        return False
    if bnb_quantized or offload != "none":
        log.info("COMPILE_TRANSFORMER skipped: only the unquantized, non-offloaded path is compiled")
        return False
    return True


def start_workers(settings: Settings) -> None:
    """Start inductor's compile workers now, if the transformer will be compiled. torch starts
    them at the first compile, a process per CPU core, each importing torch: on a 16-core H200
    machine with a kept compile cache, that took the CPU from the Lightning load that follows
    the first compile (7.0-7.8 s instead of 1.5-2.1). Called once torch is imported, while the
    worker still imports the rest on one core, they start beside it. Only on a GPU: the pool
    compiles Triton kernels; inductor compiles a CPU's C++ kernels on threads, so on a CPU
    the pool's processes (each importing torch) would only take the CPU from the worker."""
    if not torch.cuda.is_available():
        return
    device = torch.device("cuda")
    # bitsandbytes is ruled out here rather than through should_compile, which would log its
    # skip now and again at the load. Offload is left to the load (CPU_OFFLOAD=auto decides
    # there, from the GPU's free memory): an offloaded model, served eagerly, leaves the pool idle.
    if settings.uses_bitsandbytes or not should_compile(settings, device, bnb_quantized=False, offload="none"):
        return
    export_library_settings(settings)  # the workers keep the environment they start with
    from torch._inductor.async_compile import maybe_warm_pool

    maybe_warm_pool()


def compile_transformer(pipe, settings: Settings) -> None:
    """Regional compile: the 60 identical blocks share one compiled graph. torch compiles
    lazily, on the first forward, which is what the warm-up is for."""
    export_library_settings(settings)  # the inductor cache lives in MODEL_DIR
    # The blocks' one code object gets a graph per variant: text length, batch size, mask,
    # active LoRA slots. Past dynamo's limit (8) a fullgraph compile fails the job outright.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    sequences_dynamic(pipe.transformer)
    log.info("transformer blocks set up for torch.compile (regional); compiling on the warm-up edit")


def sequences_dynamic(transformer) -> None:
    """Prompts have any length and outputs and references any size, so the blocks' first
    compile should be the graph every length uses. Left to dynamo, the first length compiles
    a graph for itself alone and the second compiles again with the length symbolic. The
    text's and the image's hidden states and rotary frequencies are made before the blocks
    (`txt_in`, `img_in`, `pos_embed`), uncompiled; marking their sequence dimensions there
    gets the symbolic graph at once, so that a new size compiles nothing. `maybe_`: where
    something forces one length, dynamo specialises as before instead of failing. Registered
    after `rope_attention` and `context_parallel` replace `pos_embed`'s output, so that the
    tensors marked are those the blocks receive."""
    if getattr(transformer, "_dynamic_sequence_hooks", None) is not None:
        return
    mark = torch._dynamo.maybe_mark_dynamic

    def frequencies(module, args, freqs):
        mark(freqs[0], 0)  # the image's [S, ...]
        mark(freqs[1], 0)  # the text's [L, ...]

    transformer._dynamic_sequence_hooks = (
        transformer.txt_in.register_forward_hook(lambda module, args, text: mark(text, 1)),  # [B, L, D]
        transformer.img_in.register_forward_hook(lambda module, args, image: mark(image, 1)),  # [B, S, D]
        transformer.pos_embed.register_forward_hook(frequencies),
    )


class _ServingStance:
    """The process-wide `eager_on_recompile` stance, held while any batch of jobs runs.

    torch's stance is one global, and `set_stance` restores what it found: two batches that
    overlap (replica lanes on threads, several services in one process) and end in the other
    order would leave it on for good, so that the idle warm-ups could never compile again.
    Counting the holders restores the stance found by the first once the last has ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._held: contextlib.AbstractContextManager | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if not self._holders:
                self._held = torch.compiler.set_stance("eager_on_recompile")  # set now, restored on __exit__
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if not self._holders:
                    self._held.__exit__(None, None, None)
                    self._held = None


_SERVING = _ServingStance()


def serving(model) -> contextlib.AbstractContextManager:
    """Around a batch of jobs (`EditEngine.run_batch`): on a compiled model, a shape that no
    compiled graph covers runs eagerly instead of compiling, so that a job never waits for
    a compile (15-30 s at 1024² on an H200). Graphs are compiled by the warm-ups alone: at
    start, and while the GPU is idle."""
    return _SERVING() if model.compiled else contextlib.nullcontext()


def uncompile(pipe) -> None:
    """Undo `compile_repeated_blocks`: each block calls its eager forward again."""
    for module in pipe.transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()


def is_compile_failure(error: BaseException) -> bool:
    """Errors that torch.compile raises (dynamo, inductor, a missing compiler behind them)."""
    return isinstance(error, torch._dynamo.exc.TorchDynamoException)


def first_line(error: BaseException) -> str:
    """What a compile error says, in one line for the log (inductor's run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def fall_back_to_eager(model, error: BaseException) -> None:
    """Serve with the eager transformer from now on; say so once."""
    log.warning("torch.compile failed (%s); serving with the eager transformer instead", first_line(error))
    uncompile(model.pipe)
    model.compiled = False


def run_or_fall_back(model, run: Callable[[], T]) -> T:
    """`run()`; if the compiled transformer fails to compile a shape the warm-up did not
    cover, serve eagerly from now on and run it again."""
    try:
        return run()
    except Exception as error:
        if not (model.compiled and is_compile_failure(error)):
            raise
        fall_back_to_eager(model, error)
        return run()


def compile_step(model, step: Callable[[], bool]) -> bool:
    """One warm-up `step` that compiles ahead of the jobs; whether more remain. If compiling
    fails, serve eagerly from now on: nothing more to compile."""
    try:
        return step()
    except Exception as error:  # noqa: BLE001 - compiling failed: serve eagerly, as at start
        if not is_compile_failure(error):
            raise
        fall_back_to_eager(model, error)
        return False


def warm_up(model, run: Callable[[], None]) -> None:
    """Run the warm-up edit; if the compiled transformer fails it, fall back to eager and
    run it again, so that an error that is not about compiling still stops the start-up."""
    if not model.compiled:
        return
    try:
        run()
    except Exception as error:  # a compiler missing, or an inductor or triton error
        fall_back_to_eager(model, error)
        run()
