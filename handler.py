"""RunPod entry point: the async handler, the concurrency modifier, and `start`.

Run locally with `python handler.py --test_input '{"input": {...}}'` (or a
`test_input.json` beside it), or `python handler.py --rp_serve_api` for a local HTTP API.
"""

from __future__ import annotations

import logging
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

        # Progress goes to RunPod only when there is a RunPod to send it to.
        _service = EditService(SETTINGS, progress=None if IS_LOCAL_TEST else runpod.serverless.progress_update)
    return _service


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
    _get_service().close()
    log.info("worker stopped cleanly")
