"""The LoRA store as jobs meet it: one fetch for many jobs, every limit whatever the source,
files in use never evicted, no credentials on disk, and the endpoint's own LoRAs (`LORAS`)
checked before any job is taken."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import numpy as np
import pytest

from config import ConfigError, Settings
from qwen_edit_worker.service import EditService
from tests.loras.test_loras import _in_hub_cache, holder, hub, job, low_rank, pixels, run, server, settings, written  # noqa: F401


def test_jobs_naming_one_slow_url_share_one_fetch_and_its_outcome(holder, settings, server):
    server.trickle("/slow.safetensors", total=100, every_s=0.5)
    url = server.url("/slow.safetensors")
    impatient = dataclasses.replace(settings, lora_download_timeout_s=1.0)
    other = written(low_rank(holder.get().pipe, seed=20), "peft")
    server.serve_bytes("/other.safetensors", other)
    answers = run(impatient, holder, *(job([{"path": url}], seed=s) for s in range(3)),
                  job([{"path": server.url("/other.safetensors")}, {"path": url}], seed=3))  # fmt: skip
    assert server.hits.count("/slow.safetensors") == 1
    for answer in answers[:3]:
        assert answer == {"error": f"Input field 'loras[0].path' ({url}) took longer than LORA_DOWNLOAD_TIMEOUT_S (1 s) to download."}
    # each job is told of its own entry
    assert answers[3] == {"error": f"Input field 'loras[1].path' ({url}) took longer than LORA_DOWNLOAD_TIMEOUT_S (1 s) to download."}


def test_a_file_in_a_hub_cache_is_held_to_max_lora_bytes(holder, settings, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from qwen_edit_worker.loras import lora_store

    cache = tmp_path / "runpod-cache"
    lora = written(low_rank(holder.get().pipe, seed=21), "kohya")
    _in_hub_cache(cache, "acme/big", {"big.safetensors": lora + b"\0" * (2 * 1024**2)})
    monkeypatch.setattr(lora_store, "RUNPOD_HF_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    small = dataclasses.replace(settings, max_lora_bytes=1024**2)
    (answer,) = run(small, holder, job([{"path": "acme/big"}]))
    assert answer == {"error": "Input field 'loras[0].path' (acme/big) is larger than MAX_LORA_BYTES (1048576 bytes)."}


def test_files_in_use_are_never_evicted_and_a_job_too_large_for_the_cache_is_told_so(holder, settings, server, tmp_path):
    pipe = holder.get().pipe
    files = {f"/{seed}.safetensors": written(low_rank(pipe, seed=seed), "peft") for seed in (22, 23, 24)}
    for path, data in files.items():
        server.serve_bytes(path, data)
    size = len(files["/22.safetensors"])
    one_and_a_half = dataclasses.replace(settings, lora_cache_gb=1.5 * size / 1024**3)
    both = [{"path": server.url(path)} for path in list(files)[:2]]
    third = {"path": server.url("/24.safetensors")}
    (answer,) = run(one_and_a_half, holder, job(both))
    assert answer == {"error": "Input field 'loras' needs more room than the worker's LoRA cache has (LORA_CACHE_GB="
                               f"{one_and_a_half.lora_cache_gb:g}); send fewer or smaller LoRAs."}  # fmt: skip
    half = dataclasses.replace(settings, lora_cache_gb=0.5 * size / 1024**3)
    (answer,) = run(half, holder, job([third]))
    assert answer == {"error": f"Input field 'loras[0].path' ({third['path']}) is larger than the worker's LoRA cache "
                               f"(LORA_CACHE_GB={half.lora_cache_gb:g})."}  # fmt: skip
    # two jobs at once, each with a LoRA, in a cache with room for one: both are served
    first, second = run(one_and_a_half, holder, job(both[:1], seed=1), job(both[1:], seed=2))
    assert "output_image_base64" in first and "output_image_base64" in second
    assert len(list((tmp_path / "loras").glob("*.safetensors"))) == 1  # then the bound holds again


def test_a_file_is_counted_in_use_before_an_eviction_can_see_it(holder, settings, server, tmp_path, monkeypatch):
    """A fetch that puts its file in the cache and another job's eviction at that moment: the
    eviction must not remove the new file (it once could, before the file was counted in use,
    and the job then failed reading it or ran without the room check)."""
    from concurrent.futures import ThreadPoolExecutor

    from qwen_edit_worker.jobs.schema import LoraInput
    from qwen_edit_worker.loras import lora_store

    for seed in (28, 29):
        server.serve_bytes(f"/{seed}.safetensors", written(low_rank(holder.get().pipe, seed=seed), "peft"))
    size = len(written(low_rank(holder.get().pipe, seed=28), "peft"))
    downloads = ThreadPoolExecutor(2)
    store = lora_store.LoraStore(dataclasses.replace(settings, lora_cache_gb=1.5 * size / 1024**3), downloads)
    first = store.obtain(0, LoraInput(path=server.url("/28.safetensors")))  # held by its job
    placing = os.replace

    def replace_while_another_job_evicts(src, dst):
        placing(src, dst)
        if str(dst).endswith(".safetensors"):  # the moment the new file is in the cache folder
            another_job = threading.Thread(target=store._evict)
            another_job.start()
            another_job.join(timeout=1)  # it waits for the lock, or (the old code) removes the file

    monkeypatch.setattr(lora_store.os, "replace", replace_while_another_job_evicts)
    second = store.obtain(1, LoraInput(path=server.url("/29.safetensors")))
    monkeypatch.undo()
    store._evict()
    assert first.path.exists() and second.path.exists()  # both held by jobs: over the bound, none removed
    downloads.shutdown()


def test_the_index_on_the_volume_keeps_no_url_and_hub_downloads_leave_no_folders(holder, settings, server, hub, tmp_path):
    lora = written(low_rank(holder.get().pipe, seed=27), "kohya")
    server.serve_bytes("/signed.safetensors?X-Amz-Signature=s3cr3t", lora)
    hub.repos["acme/style"] = {"style.safetensors": written(low_rank(holder.get().pipe, seed=25), "kohya")}
    signed = server.url("/signed.safetensors?X-Amz-Signature=s3cr3t").replace("http://", "http://user:hunter2@")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "index.json").write_text(json.dumps({"https://old:pw@example.com/a.safetensors": "0" * 64}))
    answers = run(settings, holder, job([{"path": signed}]), job([{"path": "acme/style"}]))
    assert all("output_image_base64" in a for a in answers), answers
    index = (tmp_path / "loras" / "index.json").read_text()
    for secret in ("hunter2", "s3cr3t", "127.0.0.1", "acme", "old:pw"):
        assert secret not in index
    assert len(json.loads(index)) == 2
    assert [p.name for p in (tmp_path / "loras" / "incoming").iterdir()] == []
    again = run(settings, holder, job([{"path": signed}]), job([{"path": "acme/style"}]))  # found by the hashed key
    assert len(server.hits) == 1 and hub.downloads("acme/style") == 1
    assert np.array_equal(pixels(again[0]), pixels(answers[0]))


def test_fp8_with_loras_and_unusable_loras_stop_the_worker_at_start(tiny_env, holder, settings, server):
    with pytest.raises(ConfigError, match=r"^LORAS cannot be used with PRECISION_MODE=fp8"):
        Settings.from_env(tiny_env(PRECISION_MODE="fp8", LORAS='[{"path": "owner/name"}]'))
    server.serve_bytes("/house.safetensors", written(low_rank(holder.get().pipe, seed=26), "kohya"))
    server.serve_bytes("/text.safetensors", b"not a LoRA")
    house = {"path": server.url("/house.safetensors")}
    broken = dataclasses.replace(settings, default_loras=(house, {"path": server.url("/text.safetensors")}))
    service = EditService(broken, holder=holder)
    try:
        with pytest.raises(ConfigError) as refused:
            service.fetch_default_loras()
    finally:
        service.close()
    assert str(refused.value) == f"LORAS[1] ({server.url('/text.safetensors')}) is not a safetensors file."
    fine = dataclasses.replace(settings, default_loras=(house,))
    service = EditService(fine, holder=holder)
    try:
        service.fetch_default_loras()
        assert server.hits.count("/house.safetensors") == 1
        (answer,) = run(fine, holder, job(), service=service)
    finally:
        service.close()
    assert "output_image_base64" in answer and server.hits.count("/house.safetensors") == 1
