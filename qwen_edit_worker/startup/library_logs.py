"""Library log lines that are known to be harmless, silenced at their source loggers.

Set before the libraries load, so that a worker's start-up log holds what a deployer should
read. Each entry says why it is harmless here.
"""

from __future__ import annotations

import logging

HARMLESS = {
    # diffusers looks for torchao tensor classes that torchao 0.18 moved, to allow unpickling
    # torchao-serialised checkpoints; the worker quantizes itself and loads none.
    "diffusers.quantizers.torchao.torchao_quantizer": logging.ERROR,
}


def quiet() -> None:
    for name, level in HARMLESS.items():
        logging.getLogger(name).setLevel(level)
