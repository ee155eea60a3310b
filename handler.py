"""RunPod entry point: the async handler, the concurrency modifier, and `start`.

Run locally with `python handler.py --test_input '{"input": {...}}'` (or a
`test_input.json` beside it), or `python handler.py --rp_serve_api` for a local HTTP API.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys

from config import ConfigError, Settings
from qwen_edit_worker.startup import cpu_name, library_logs, model_files, prefetch, startup_clock

log = logging.getLogger("qwen_edit_worker")
library_logs.quiet()  # before any library loads, in this process and in the GPU processes it spawns


def _exit(code: int, message: str | None = None) -> None:
    """Leave the process now, with `code`: the one way this worker exits.

    `os._exit` after stopping child processes and flushing, because a normal interpreter
    exit runs the C++ static destructors of torch and its libraries while daemon threads (the
    GPU thread, thread pools) may still be inside them, which can abort ("terminate called
    without an active exception") instead of returning `code`.
    """
    if message:
        print(message, file=sys.stderr)
    # os._exit skips multiprocessing's own exit handler, which would stop the SDK's heartbeat
    # process: stop it (and any other child) here, or it would go on pinging RunPod.
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=2)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


try:
    SETTINGS = Settings.from_env()
except ConfigError as config_error:
    # Stop before taking any job: a worker with a bad setting would fail every job.
    if __name__ != "__main__":
        raise
    _exit(1, f"qwen-edit-worker: invalid configuration: {config_error}")

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The weights start coming into memory now, while the heavy imports below (runpod, torch,
    # transformers, diffusers: 20-40 s on a cold disk) run.
    prefetch.start(model_files.local_model_path(SETTINGS), model_files.local_lora_path(SETTINGS))
    from qwen_edit_worker.engine import compilation  # torch

    compilation.start_workers(SETTINGS)  # torch's compile workers start beside the imports still to come

cpu_name.install()  # runpod's import would start a second Python process to name the CPU
import runpod  # noqa: E402 - after the prefetch started
from runpod.serverless.modules.worker_state import IS_LOCAL_TEST  # noqa: E402

from qwen_edit_worker import startup_checks  # noqa: E402
from qwen_edit_worker.engine import compile_cache  # noqa: E402
from qwen_edit_worker.jobs import sdk_guards  # noqa: E402

sdk_guards.install()  # a job holding a huge integer must not lose the jobs taken with it

_service = None


def _get_service():
    global _service
    if _service is None:
        from qwen_edit_worker.service import EditService

        startup_clock.mark("imports done")
        prefetch.imports_done()  # the weights still to read now get the disk
        # Progress goes to RunPod, and a broken worker retires, only when deployed on RunPod.
        deployed = not IS_LOCAL_TEST
        _service = EditService(
            SETTINGS,
            progress=runpod.serverless.progress_update if deployed else None,
            on_broken=_retire if deployed else None,
        )
    return _service


def _retire(failure: Exception) -> None:
    """The model failed to load or the GPU broke: stop taking jobs, answer those held, exit 1.

    SIGTERM makes RunPod's JobScaler stop taking jobs and drain the ones it holds (each gets
    the error with `refresh_worker`, so RunPod replaces this worker); then `start` returns.
    Before the JobScaler has taken over SIGTERM, `_stop_before_serving` handles it.
    """
    log.error("retiring this worker: %s", failure)
    os.kill(os.getpid(), signal.SIGTERM)


class _StopBeforeServing(BaseException):
    """SIGTERM arrived before RunPod's worker loop installed its own handler.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
    (runpod's start-up included) swallows it."""


def _stop_before_serving(signum, frame) -> None:
    raise _StopBeforeServing()


async def handler(job: dict) -> dict:
    return await _get_service().handle(job)


def concurrency_modifier(current_concurrency: int) -> int:
    # A constant: RunPod's JobScaler waits for the worker to drain whenever this changes.
    return SETTINGS.max_concurrency


def _serve() -> int:
    """Run the worker until RunPod stops it; the exit code."""
    # Until RunPod's JobScaler installs its handler, SIGTERM (from RunPod, or from `_retire`
    # when the model fails to load early) stops the start-up instead of killing the process.
    signal.signal(signal.SIGTERM, _stop_before_serving)
    serving = False
    try:
        startup_checks.run(SETTINGS)  # a folder or bucket that cannot be used stops the worker here
    except ConfigError as unusable:
        _exit(1, f"qwen-edit-worker: invalid configuration: {unusable}")
    try:
        service = _get_service()  # starts loading the model while the worker connects to RunPod
        try:
            service.fetch_default_loras()  # no job is taken before the endpoint's own LoRAs are here and checked
        except ConfigError as unusable:
            _exit(1, f"qwen-edit-worker: invalid configuration: {unusable}")
        # On SIGTERM RunPod's JobScaler stops taking jobs and waits for the ones it holds;
        # then start() returns and the batcher finishes anything left.
        serving = True
        runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})
        return 0
    except _StopBeforeServing:  # also how the local API server (--rp_serve_api) ends: it keeps our handler
        log.info("stopped" if serving else "stopped before the worker loop started")
        return 0
    except SystemExit as done:  # runpod's local test mode (--test_input) ends with sys.exit
        return done.code if isinstance(done.code, int) else 1


if __name__ == "__main__":
    exit_code = _serve()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the drain
    service = _get_service()
    service.close()
    compile_cache.wait_for_saves(30)  # a worker stopped soon after its start still leaves its compile
    if service.batcher.failure is not None:
        _exit(1, f"qwen-edit-worker: stopped because {service.batcher.failure}")
    log.info("worker stopped (exit code %d)", exit_code)
    _exit(exit_code)
