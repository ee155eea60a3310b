"""Limits that must hold in time for the whole service: slow downloads hold no thread that
other jobs need, and every job is answered within the download limit."""

from __future__ import annotations

import asyncio
import time

from config import Settings
from qwen_edit_worker.service import EditService
from tests.conftest import random_image
from tests.image_server import ImageServer
from tests.jobs.test_images import png_bytes
from tests.test_handler import SAMPLE


def test_a_base64_job_beside_many_slow_urls_is_served_at_its_usual_speed(tiny_env, base_holder):
    settings = Settings.from_env(tiny_env(ALLOW_PRIVATE_IMAGE_URLS="true", IMAGE_DOWNLOAD_TIMEOUT_S="3",
                                          MAX_CONCURRENCY="9", BATCH_WAIT_MS="0"))  # fmt: skip
    server = ImageServer()
    body = png_bytes(random_image(8, 8))
    server.raw("/slow.png", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body, every_s=0.5, per_write=4)
    fast_job = {"id": "fast", "input": {"prompt": "x", "image_base64": SAMPLE, "width": 64, "height": 64,
                                        "num_inference_steps": 1}}  # fmt: skip
    slow_jobs = [{"id": f"slow-{i}", "input": {"prompt": "x", "image_url": server.url("/slow.png")}} for i in range(8)]

    async def scenario():
        service = EditService(settings, holder=base_holder)
        finished: dict[str, float] = {}
        start = time.monotonic()

        async def run(job):
            answer = await service.handle(job)
            finished[job["id"]] = time.monotonic() - start
            return job["id"], answer

        try:
            slow = [asyncio.create_task(run(job)) for job in slow_jobs]
            await asyncio.sleep(0.3)  # the slow downloads have started and hold their threads
            fast = await run(fast_job)
            return fast, [await task for task in slow], finished
        finally:
            service.close()

    try:
        (_, fast), slow, finished = asyncio.run(scenario())
    finally:
        server.close()
    assert "output_image_base64" in fast
    assert finished["fast"] < 2.5 < min(finished[f"slow-{i}"] for i in range(8))  # served before any slow one ended
    for _, answer in slow:
        assert answer == {"error": "Input image 1 took longer than IMAGE_DOWNLOAD_TIMEOUT_S (3 s) to download."}
    assert max(finished.values()) < 4.5  # every job answered within the limit (and a margin)
