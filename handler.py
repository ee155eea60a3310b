"""RunPod entry point: the async handler, the concurrency modifier, and `start`.

Run locally with `python handler.py --test_input '{"input": {...}}'` (or a
`test_input.json` beside it), or `python handler.py --rp_serve_api` for a local HTTP API.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import runpod
from runpod.serverless.modules.worker_state import IS_LOCAL_TEST

from config import ConfigError, Settings

log = logging.getLogger("qwen_edit_worker")

try:
    SETTINGS = Settings.from_env()
except ConfigError as config_error:
    # Stop before taking any job: a worker with a bad setting would fail every job.
    sys.exit(f"qwen-edit-worker: invalid configuration: {config_error}")

_service = None


def _get_service():
    global _service
    if _service is None:
        from service import EditService

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
    """
    log.error("retiring this worker: %s", failure)
    os.kill(os.getpid(), signal.SIGTERM)


async def handler(job: dict) -> dict:
    return await _get_service().handle(job)


def concurrency_modifier(current_concurrency: int) -> int:
    # A constant: RunPod's JobScaler waits for the worker to drain whenever this changes.
    return SETTINGS.max_concurrency


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _get_service()  # starts loading the model while the worker connects to RunPod
    # On SIGTERM RunPod's JobScaler stops taking jobs and waits for the ones it holds;
    # then start() returns and the batcher finishes anything left before the exit (code 0).
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})
    service = _get_service()
    service.close()
    if service.batcher.failure is not None:
        sys.exit(f"qwen-edit-worker: stopped because {service.batcher.failure}")
    log.info("worker stopped cleanly")
