"""Per-request LoRA files: fetched safely, checked, and kept on disk by content.

A job names a LoRA by URL (fetched by `fetching` under `MAX_LORA_BYTES` and
`LORA_DOWNLOAD_TIMEOUT_S`, with the same address checks as images) or by Hugging Face repo
(found in RunPod's model cache or the Hugging Face cache, else downloaded with
huggingface_hub; `HF_TOKEN` is read by huggingface_hub itself). Every file, whatever its
source, is held to `MAX_LORA_BYTES` and checked (`lora_files`) on the download thread,
before the GPU thread sees it; content refused once is refused at once after (by its hash).
Files are stored under `MODEL_DIR/loras/<sha256>.safetensors`, at most `LORA_CACHE_GB` of
them, the least recently used removed first, never one a job holds. `loras/index.json`
maps a hash of each source to its file: no URL, with its credentials, is written to disk.
A source is never fetched again once kept (use versioned URLs or Hub revisions to change a
LoRA). Several jobs asking for one source at once share one fetch and its outcome. Only
safetensors are read: nothing in a LoRA file is ever executed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

from config import RUNPOD_HF_CACHE, Settings
from qwen_edit_worker.errors import InputError
from qwen_edit_worker.jobs import fetching
from qwen_edit_worker.jobs.schema import LoraInput
from qwen_edit_worker.loras import lora_files
from qwen_edit_worker.startup.model_files import find_in_caches

log = logging.getLogger("qwen_edit_worker.lora_store")

SOURCE_KEY = re.compile(r"[0-9a-f]{64}")  # index.json's keys: sha256 of the source


class _Fetch(Future):
    """One source's fetch under way, and the job entry (`loras[i]`) whose sentence it gives."""

    def __init__(self, subject: str):
        super().__init__()
        self.subject = subject


@dataclass(frozen=True)
class LoraFile:
    source: str  # what the job named: the URL, or repo/weight_name
    path: Path
    sha256: str
    text_encoder_skipped: bool = False  # it also held text-encoder weights, which are not applied


class LoraStore:
    def __init__(self, settings: Settings, downloads: Executor):
        self.settings = settings
        self.root = Path(settings.model_dir) / "loras"
        self._downloads = downloads
        self._lock = threading.Lock()
        self._fetches: dict[str, Future] = {}  # source -> the fetch under way
        self._index_path = self.root / "index.json"
        self._index: dict[str, str] | None = None  # sha256 of the source -> sha256 of the file
        self._in_use: dict[str, int] = {}  # sha256 -> jobs holding it (never evicted)
        self._refused: dict[str, str] = {}  # sha256 -> why, for content refused before
        self._over = False  # the cache is over LORA_CACHE_GB because jobs hold its files

    async def resolve(self, loras: list[LoraInput], setting: bool = False) -> list[LoraFile]:
        """The file of each LoRA, in order, or an `InputError` naming `loras[i].path` (`LORAS[i]`
        for the endpoint's own: `setting`)."""
        loop = asyncio.get_running_loop()
        pending = [loop.run_in_executor(self._downloads, self.obtain, i, lora, setting) for i, lora in enumerate(loras)]
        results = await asyncio.gather(*pending, return_exceptions=True)
        files = [r for r in results if isinstance(r, LoraFile)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures and self._bytes({f.sha256: f.path for f in files}.values()) > self._limit():
            field = "LORAS" if setting else "Input field 'loras'"
            failures = [InputError(f"{field} needs more room than the worker's LoRA cache has (LORA_CACHE_GB="
                                   f"{self.settings.lora_cache_gb:g}); send fewer or smaller LoRAs.")]  # fmt: skip
        if failures:
            self.release(files)
            raise failures[0]
        return files

    def release(self, files: list[LoraFile]) -> None:
        with self._lock:
            for file in files:
                self._in_use[file.sha256] -= 1
            over = self._over
        if over:  # files held by jobs kept the cache over its bound: they may go now
            self._evict()

    def obtain(self, i: int, lora: LoraInput, setting: bool = False) -> LoraFile:
        """Find or fetch one LoRA (blocking); the caller must `release` it after its job.
        Jobs asking for the same source meanwhile wait for this fetch and share its outcome."""
        source = lora.path if lora.weight_name is None else f"{lora.path}/{lora.weight_name}"
        subject = lora_subject(i, lora.path, setting)
        with self._lock:
            fetch = self._fetches.get(source)
            if fetch is None:
                fetch = self._fetches[source] = _Fetch(subject)
                leader = True
            else:
                leader = False
        if leader:
            try:
                fetch.set_result(self._obtain(source, lora, subject))
            except BaseException as error:
                fetch.set_exception(error)
            finally:
                with self._lock:
                    del self._fetches[source]
        try:
            file = fetch.result()
        except InputError as error:  # the sentence names the first job's entry: name this one's
            raise type(error)(str(error).replace(fetch.subject, subject, 1)) from None
        if not leader:
            with self._lock:  # the fetch counted its own job in; each sharer counts itself
                if not file.path.exists():  # evicted since, after every job before had released it
                    raise InputError(f"{subject} was removed from the LoRA cache meanwhile; retry the job.")
                self._in_use[file.sha256] = self._in_use.get(file.sha256, 0) + 1
        return file

    def _obtain(self, source: str, lora: LoraInput, subject: str) -> LoraFile:
        file = self._cached(source)
        if file is not None:
            return file
        path = self._download(lora, subject) if lora.is_url else self._from_hub(lora, subject)
        return self._check_and_keep(source, path, subject, owned=lora.is_url or self._tmp() in path.parents)

    # ----------------------------------------------------------------------- the disk cache

    def _load_index(self) -> dict[str, str]:
        if self._index is None:
            try:
                index = json.loads(self._index_path.read_text())
            except (OSError, ValueError):
                index = {}
            # an older index kept the sources themselves (URLs with their credentials): dropped
            self._index = {k: v for k, v in index.items() if SOURCE_KEY.fullmatch(k)} if isinstance(index, dict) else {}
        return self._index

    def _cached(self, source: str) -> LoraFile | None:
        """The kept file of `source`, counted as in use, if there is one (and it still reads:
        else it is fetched and checked again)."""
        with self._lock:
            sha = self._load_index().get(_source_key(source))
            path = self.root / f"{sha}.safetensors"
            if sha is None or not path.exists():
                return None
            self._in_use[sha] = self._in_use.get(sha, 0) + 1  # before anything can evict it
        try:
            text_encoder = lora_files.holds_text_encoder_weights(path, "A kept LoRA")
        except (InputError, OSError):
            self.release([LoraFile(source, path, sha)])
            return None
        os.utime(path)  # used now: last to be evicted
        return LoraFile(source, path, sha, text_encoder)

    def _limit(self) -> float:
        return self.settings.lora_cache_gb * 1024**3

    @staticmethod
    def _bytes(paths) -> int:
        return sum(path.stat().st_size for path in paths if path.exists())

    def _tmp(self) -> Path:
        folder = self.root / "incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _check_and_keep(self, source: str, path: Path, subject: str, owned: bool) -> LoraFile:
        """Check a fetched (or found) file, keep it under its hash, count it in use, evict others."""
        try:
            size = path.stat().st_size
            if size > self.settings.max_lora_bytes:  # a file found in a cache is held to the limit too
                raise InputError(f"{subject} is larger than MAX_LORA_BYTES ({self.settings.max_lora_bytes} bytes).")
            if size > self._limit():
                raise InputError(f"{subject} is larger than the worker's LoRA cache (LORA_CACHE_GB="
                                 f"{self.settings.lora_cache_gb:g}).")  # fmt: skip
            sha = sha256_of(path)
            if sha in self._refused:
                raise lora_files.LoraError(f"{subject} {self._refused[sha]}")
            try:
                text_encoder = lora_files.check_file(path, subject)
            except lora_files.LoraError as error:
                self._refused[sha] = str(error).removeprefix(subject).lstrip()
                raise
            # Put in the folder and counted in use in one step under the lock: an eviction for
            # another job between the two would see a file no job holds, and remove it.
            with self._lock:
                kept = self._place(path, sha, owned)
                self._in_use[sha] = self._in_use.get(sha, 0) + 1  # this job's: never evicted under it
                self._load_index()[_source_key(source)] = sha
                self._write_index()
        finally:
            if owned and path.exists():
                path.unlink()
        self._evict()
        return LoraFile(source, kept, sha, text_encoder)

    def _place(self, path: Path, sha: str, owned: bool) -> Path:
        """The checked file under its hash in the cache folder (moved there if the store
        fetched it; a link, or the file itself, if it lies in another cache)."""
        kept = self.root / f"{sha}.safetensors"
        if owned:
            os.replace(path, kept)
        elif not kept.exists():
            try:
                os.link(path.resolve(), kept)
            except OSError:
                kept = path.resolve()
        return kept

    def _write_index(self) -> None:
        tmp = self._index_path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self._index))
        os.replace(tmp, self._index_path)

    def _evict(self) -> None:
        """Remove the least recently used files until the cache is under LORA_CACHE_GB; files
        that jobs hold stay (the cache may be over its bound until they are released)."""
        # Listed and removed under the lock: a job's release and another job's fetch may evict
        # at once, and one would otherwise stat or remove a file the other has just removed.
        with self._lock:
            files = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
            total = self._bytes(files)
            for path in files:
                if total <= self._limit():
                    break
                sha = path.stem
                if self._in_use.get(sha, 0) > 0:
                    continue
                total -= path.stat().st_size
                path.unlink()
                for key in [k for k, h in self._load_index().items() if h == sha]:
                    del self._index[key]
                log.info("LoRA cache over %.1f GB: removed %s", self.settings.lora_cache_gb, path.name)
            self._over = total > self._limit()
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
            return Path(found)  # held to MAX_LORA_BYTES before it is read (`_check_and_keep`)
        try:  # the Hub says the size before any byte is sent: refuse a file that is too large then
            size = get_hf_file_metadata(hf_hub_url(lora.path, weight_name)).size
        except Exception as error:  # noqa: BLE001 - huggingface_hub's and its HTTP client's errors
            raise InputError(_hub_unavailable(subject, f"{lora.path}/{weight_name}", error)) from None
        if size is not None and size > self.settings.max_lora_bytes:
            raise InputError(f"{subject} is larger than MAX_LORA_BYTES ({self.settings.max_lora_bytes} bytes).")
        folder = self._tmp() / uuid.uuid4().hex  # hf_hub_download also leaves a .cache folder in it
        try:
            path = Path(hf_hub_download(lora.path, weight_name, local_dir=folder))
            final = self._tmp() / f"{uuid.uuid4().hex}.part"
            os.replace(path, final)  # MAX_LORA_BYTES is applied to it as to any file (`_check_and_keep`)
        except Exception as error:  # noqa: BLE001 - huggingface_hub's and its HTTP client's errors
            raise InputError(_hub_unavailable(subject, f"{lora.path}/{weight_name}", error)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return final

    def _only_safetensors(self, repo: str, subject: str) -> str:
        """The repo's one .safetensors file (a repo with several needs `weight_name`)."""
        from huggingface_hub import list_repo_files

        names = _local_safetensors(repo)
        if not names:
            try:
                names = [n for n in list_repo_files(repo) if n.endswith(".safetensors")]
            except Exception as error:  # noqa: BLE001 - huggingface_hub's and its HTTP client's errors
                raise InputError(_hub_unavailable(subject, repo, error)) from None
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_key(source: str) -> str:
    """What index.json keeps of a source: its hash (a URL can carry credentials)."""
    return hashlib.sha256(source.encode()).hexdigest()


def lora_subject(index: int, path: str, setting: bool = False) -> str:
    """How an error names a LoRA: its place in the job's `loras` (or in the endpoint's `LORAS`
    setting) and its path, credentials removed."""
    if setting:
        return f"LORAS[{index}] ({_shown(path)})"
    return f"Input field 'loras[{index}].path' ({_shown(path)})"


def _shown(path: str) -> str:
    """A URL without userinfo or query (they can hold credentials), cut to a readable length."""
    from qwen_edit_worker.jobs.outputs import redact_url

    shown = redact_url(path) if "://" in path else path
    return shown if len(shown) <= 100 else shown[:97] + "..."


def _hub_unavailable(subject: str, what: str, error: BaseException) -> str:
    """One sentence for a Hub failure: a missing repo or file, access refused (HF_TOKEN), or
    the Hub out of reach. The cause goes to the log, without the library's text in the answer."""
    from huggingface_hub import errors

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.OfflineModeIsEnabled):
        cause = "is not in the model caches, and HF_HUB_OFFLINE keeps this worker from downloading it"
    elif isinstance(error, errors.GatedRepoError):
        cause = "is a gated repo: accept its terms on huggingface.co and set HF_TOKEN on the endpoint"
    elif isinstance(error, errors.RepositoryNotFoundError):
        cause = "names no repo on Hugging Face, or a private one that the endpoint's HF_TOKEN does not open"
    elif isinstance(error, errors.EntryNotFoundError):
        cause = "names a file that the repo does not have"
    elif status in (401, 403):
        cause = "was refused by Hugging Face: set HF_TOKEN on the endpoint for private or gated repos"
    elif status is not None:
        cause = f"could not be downloaded: Hugging Face answered HTTP {status}; retry the job"
    else:
        cause = "could not be downloaded: Hugging Face could not be reached; retry the job"
    log.warning("Hugging Face: %s failed: %s (%s)", what, type(error).__name__, status or "no answer")
    return f"{subject} {cause}."
