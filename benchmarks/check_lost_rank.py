"""On two GPUs: a rank that dies while rank 0 waits for it in an NCCL collective.

    python3 benchmarks/check_lost_rank.py
    python3 benchmarks/check_lost_rank.py --cpu     # CPU smoke run on gloo (which notices by itself)

NCCL does not notice a peer process that is gone: rank 0's collective would wait for the
process group's timeout (10 minutes in context mode). `context_ranks.watch` sees the process
end and `context_ranks.abort_group` ends the communicators, as `context_ranks.Followers`
does. Rank 1 takes part in one all-reduce and exits; rank 0 starts a second and waits for
it. PASS if that wait ends within 60 s (with the time and what it raised, or that it
returned), FAIL otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qwen_edit_worker.gpus import context_ranks  # noqa: E402


def device(rank: int, cpu: bool) -> torch.device:
    return torch.device("cpu") if cpu else torch.device("cuda", rank)


def all_reduce(where: torch.device) -> None:
    dist.all_reduce(torch.ones(1 << 20, device=where))
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def follower(store: str, cpu: bool) -> None:
    where = device(1, cpu)
    context_ranks._join(store, 1, 2, where, context_ranks.TIMEOUT)  # as the worker's ranks join
    all_reduce(where)
    time.sleep(3)  # rank 0 is waiting in the next all-reduce by now
    os._exit(3)  # gone without a word, as a crashed or killed process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU: a smoke run of this script")
    args = parser.parse_args()
    store = os.path.join(tempfile.mkdtemp(), "store")
    process = multiprocessing.get_context("spawn").Process(target=follower, args=(store, args.cpu), name="rank-1")
    process.start()
    where = device(0, args.cpu)
    context_ranks._join(store, 0, 2, where, context_ranks.TIMEOUT)
    all_reduce(where)
    ended = []

    def on_stop(names: list[str]) -> None:
        ended.append(time.perf_counter())
        if where.type == "cuda":
            context_ranks.abort_group()

    watching = context_ranks.watch([process], on_stop)
    start = time.perf_counter()
    outcome = "returned"
    try:
        for _ in range(3):
            all_reduce(where)
    except Exception as error:  # noqa: BLE001 - what it raises is what this check reports
        outcome = f"raised {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    waited = time.perf_counter() - start
    # gloo fails the wait as soon as the follower's sockets close, a moment before its exit shows
    process.join(timeout=context_ranks.LOST_GRACE_S)
    watching.join(timeout=context_ranks.LOST_GRACE_S)
    seen = f"{ended[0] - start:.1f} s" if ended else "never"
    verdict = "PASS" if waited < 60 else "FAIL"
    print(f"{verdict}: rank 1 exited ({process.exitcode}); the watch saw it after {seen}; "
          f"rank 0's wait ended after {waited:.1f} s and {outcome}", flush=True)
    os._exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
