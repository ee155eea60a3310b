"""Per-request LoRA files: fetched safely, checked, and kept on disk by content.

A job names a LoRA by URL (fetched by `fetching` under `MAX_LORA_BYTES` and
`LORA_DOWNLOAD_TIMEOUT_S`, with the same address checks as images) or by Hugging Face repo
(found in RunPod's model cache or the Hugging Face cache, else downloaded with
huggingface_hub; `HF_TOKEN` is read by huggingface_hub itself). Files are stored under
`MODEL_DIR/loras/<sha256>.safetensors`, at most `LORA_CACHE_GB` of them, the least recently
used removed first; the same source asked for by several jobs at once is fetched once.
Only safetensors are read: nothing in a LoRA file is ever executed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import threading
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import fetching
from config import RUNPOD_HF_CACHE, Settings
from model_files import find_in_caches
from schema import InputError, LoraInput

log = logging.getLogger("qwen_edit_worker.lora_store")

# Key prefixes of LoRAs made for the text encoder (kohya, diffusers): this worker applies
# LoRAs to the transformer only.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder.", "te.", "te1.", "te2.")


@dataclass(frozen=True)
class LoraFile:
    source: str  # what the job named: the URL, or repo/weight_name
    path: Path
    sha256: str


class LoraStore:
    def __init__(self, settings: Settings, downloads: Executor):
        self.settings = settings
        self.root = Path(settings.model_dir) / "loras"
        self._downloads = downloads
        self._lock = threading.Lock()
        self._source_locks: dict[str, threading.Lock] = {}
        self._index_path = self.root / "index.json"
        self._index: dict[str, str] | None = None  # source -> sha256
        self._in_use: dict[str, int] = {}  # sha256 -> jobs holding it (never evicted)

    async def resolve(self, loras: list[LoraInput]) -> list[LoraFile]:
        """The file of each LoRA, in order, or an `InputError` naming `loras[i].path`."""
        loop = asyncio.get_running_loop()
        pending = [loop.run_in_executor(self._downloads, self.obtain, i, lora) for i, lora in enumerate(loras)]
        results = await asyncio.gather(*pending, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self.release([r for r in results if isinstance(r, LoraFile)])
            raise failures[0]
        return list(results)

    def release(self, files: list[LoraFile]) -> None:
        with self._lock:
            for file in files:
                self._in_use[file.sha256] -= 1

    def obtain(self, i: int, lora: LoraInput) -> LoraFile:
        """Find or fetch one LoRA (blocking); the caller must `release` it after its job."""
        source = lora.path if lora.weight_name is None else f"{lora.path}/{lora.weight_name}"
        subject = lora_subject(i, lora.path)
        with self._source_lock(source):
            file = self._cached(source)
            if file is None:
                path = self._download(lora, subject) if lora.is_url else self._from_hub(lora, subject)
                file = self._check_and_keep(source, path, subject, owned=lora.is_url or path.parent == self._tmp())
        with self._lock:
            self._in_use[file.sha256] = self._in_use.get(file.sha256, 0) + 1
        return file

    # ----------------------------------------------------------------------- the disk cache

    def _source_lock(self, source: str) -> threading.Lock:
        with self._lock:
            return self._source_locks.setdefault(source, threading.Lock())

    def _load_index(self) -> dict[str, str]:
        if self._index is None:
            try:
                self._index = json.loads(self._index_path.read_text())
            except (OSError, ValueError):
                self._index = {}
        return self._index

    def _cached(self, source: str) -> LoraFile | None:
        with self._lock:
            sha = self._load_index().get(source)
        if sha is None:
            return None
        path = self.root / f"{sha}.safetensors"
        if not path.exists():
            return None
        os.utime(path)  # used now: last to be evicted
        return LoraFile(source, path, sha)

    def _tmp(self) -> Path:
        folder = self.root / "incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _check_and_keep(self, source: str, path: Path, subject: str, owned: bool) -> LoraFile:
        try:
            check_safetensors(path, subject)
            sha = sha256_of(path)
            kept = self.root / f"{sha}.safetensors"
            if owned:
                os.replace(path, kept)
            elif not kept.exists():  # a file in another cache: keep a link (or a copy) under ours
                try:
                    os.link(path.resolve(), kept)
                except OSError:
                    kept = path.resolve()
        finally:
            if owned and path.exists():
                path.unlink()
        with self._lock:
            self._load_index()[source] = sha
            self._write_index()
        self._evict()
        return LoraFile(source, kept, sha)

    def _write_index(self) -> None:
        tmp = self._index_path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self._index))
        os.replace(tmp, self._index_path)

    def _evict(self) -> None:
        """Remove the least recently used files until the cache is under LORA_CACHE_GB."""
        limit = self.settings.lora_cache_gb * 1024**3
        files = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        with self._lock:
            for path in files:
                if total <= limit:
                    break
                sha = path.stem
                if self._in_use.get(sha, 0) > 0:
                    continue
                total -= path.stat().st_size
                path.unlink()
                for source in [s for s, h in self._load_index().items() if h == sha]:
                    del self._index[source]
                log.info("LoRA cache over %.1f GB: removed %s", self.settings.lora_cache_gb, path.name)
            self._write_index()

    # ----------------------------------------------------------------------- fetching

    def _download(self, lora: LoraInput, subject: str) -> Path:
        policy = fetching.FetchPolicy(
            max_bytes=self.settings.max_lora_bytes,
            timeout_s=self.settings.lora_download_timeout_s,
            allow_private=self.settings.allow_private_image_urls,
            bytes_setting="MAX_LORA_BYTES",
            timeout_setting="LORA_DOWNLOAD_TIMEOUT_S",
            private_setting="ALLOW_PRIVATE_IMAGE_URLS",
        )
        handle, name = tempfile.mkstemp(dir=self._tmp(), suffix=".part")
        try:
            with os.fdopen(handle, "wb") as sink:
                fetching.fetch_into(lora.path, sink, subject, policy)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        log.info("downloaded LoRA %s", _shown(lora.path))
        return Path(name)

    def _from_hub(self, lora: LoraInput, subject: str) -> Path:
        """A repo's file: from RunPod's model cache or the Hugging Face cache, else downloaded."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

        weight_name = lora.weight_name or self._only_safetensors(lora.path, subject)

        def fetch(**kwargs):
            return hf_hub_download(lora.path, weight_name, **kwargs)

        found = find_in_caches(fetch, [RUNPOD_HF_CACHE, None], f"LoRA {lora.path}/{weight_name}")
        if found is not None:
            return Path(found)
        unavailable = f"{subject} could not be downloaded from Hugging Face (no such repo or file, or access refused)."
        try:  # the Hub says the size before any byte is sent: refuse a file that is too large then
            size = get_hf_file_metadata(hf_hub_url(lora.path, weight_name)).size
        except Exception:  # noqa: BLE001 - huggingface_hub's and its HTTP client's errors
            raise InputError(unavailable) from None
        if size is not None and size > self.settings.max_lora_bytes:
            raise InputError(f"{subject} is larger than MAX_LORA_BYTES ({self.settings.max_lora_bytes} bytes).")
        try:
            path = Path(hf_hub_download(lora.path, weight_name, local_dir=self._tmp() / uuid.uuid4().hex))
        except Exception:  # noqa: BLE001 - huggingface_hub's and its HTTP client's errors
            raise InputError(unavailable) from None
        if path.stat().st_size > self.settings.max_lora_bytes:  # a Hub that said otherwise
            path.unlink()
            raise InputError(f"{subject} is larger than MAX_LORA_BYTES ({self.settings.max_lora_bytes} bytes).")
        final = self._tmp() / f"{uuid.uuid4().hex}.part"
        os.replace(path, final)
        return final

    def _only_safetensors(self, repo: str, subject: str) -> str:
        """The repo's one .safetensors file (a repo with several needs `weight_name`)."""
        from huggingface_hub import list_repo_files

        names = _local_safetensors(repo)
        if not names:
            try:
                names = [n for n in list_repo_files(repo) if n.endswith(".safetensors")]
            except Exception:  # noqa: BLE001 - huggingface_hub's and its HTTP client's errors
                raise InputError(f"{subject} could not be listed on Hugging Face (no such repo, or access refused).") from None
        if len(names) != 1:
            raise InputError(
                f"{subject} holds {len(names)} .safetensors files; name one with 'weight_name'."
                if names else f"{subject} holds no .safetensors file."
            )
        return names[0]


def _local_safetensors(repo: str) -> list[str]:
    """.safetensors files of the repo's snapshot in RunPod's model cache, if it is there."""
    snapshots = Path(RUNPOD_HF_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    for snapshot in sorted(snapshots.glob("*")) if snapshots.exists() else []:
        return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.safetensors"))
    return []


def check_safetensors(path: Path, subject: str) -> None:
    """A safetensors file for the transformer: refuse anything else in a sentence."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as tensors:
            keys = list(tensors.keys())
    except Exception:  # noqa: BLE001 - safetensors' errors: not a safetensors file
        raise InputError(f"{subject} is not a safetensors file.") from None
    if not keys:
        raise InputError(f"{subject} holds no tensors.")
    if all(key.startswith(TEXT_ENCODER_PREFIXES) for key in keys):
        raise InputError(f"{subject} is a text-encoder LoRA; this worker applies LoRAs to the transformer only.")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_subject(index: int, path: str) -> str:
    """How an error names a job's LoRA: its place in `loras` and its path, credentials removed."""
    return f"Input field 'loras[{index}].path' ({_shown(path)})"


def _shown(path: str) -> str:
    """A URL without userinfo or query (they can hold credentials), cut to a readable length."""
    from outputs import redact_url

    shown = redact_url(path) if "://" in path else path
    return shown if len(shown) <= 100 else shown[:97] + "..."
