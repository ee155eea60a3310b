"""Shipping files that cannot be run here (no Docker engine) are checked by reading them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import schema
from config import LIBRARY_VARIABLES, Settings, variable_names, variable_specs

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_PACKAGES = {"torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes",
                     "runpod", "pillow", "huggingface_hub", "pydantic"}  # fmt: skip


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_requirements_are_pinned_and_complete():
    lines = requirement_lines("requirements.txt")
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.+\-]*", line) for line in lines), lines
    assert REQUIRED_PACKAGES <= {line.split("==")[0].lower() for line in lines}
    assert all("==" in line for line in requirement_lines("requirements-dev.txt"))


def test_dockerfile_installs_requirements_and_runs_the_handler():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+$", text, re.M)
    assert re.search(r"^COPY requirements\.txt", text, re.M) and "pip install -r requirements.txt" in text
    assert re.search(r'^CMD \["python", "-u", "handler.py"\]$', text, re.M)
    assert re.search(r"^COPY \*\.py test_input\.json \./$", text, re.M)  # every module ships
    # The start-up's files are listed once the code is in place (the listing imports it).
    assert re.search(r"^RUN python import_set\.py$", text, re.M) and text.index("import_set.py") > text.index("COPY *.py")
    assert "tests" in (ROOT / ".dockerignore").read_text().split()
    # triton (torch.compile on a GPU) compiles a C launcher at run time; --no-install-recommends
    # leaves out libc6-dev unless it is named.
    packages = re.search(r"apt-get install -y --no-install-recommends ([^\\&]+)", text).group(1).split()
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(packages)
    for downloader in ("snapshot_download", "hf_hub_download", "huggingface-cli", "hf download"):
        assert downloader not in text  # no weights in the image


@pytest.mark.parametrize(
    "args, tag, bake",
    [(["me/worker"], "latest", ""), (["me/worker", "1.0"], "1.0", ""), (["me/worker", "--bake-lightning", "8"], "latest", "8"),
     (["me/worker", "1.0", "--bake-lightning", "4,8"], "1.0", "4,8")],
)  # fmt: skip
def test_build_script_targets_amd64_and_takes_image_tag_and_the_lightning_to_bake(tmp_path, args, tag, bake):
    # No Docker engine here: a stand-in `docker` on PATH records what build.sh asks of it.
    stub = tmp_path / "docker"
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n')
    stub.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "build.sh"), *args], env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    called = (tmp_path / "args").read_text().split()
    assert called[:3] == ["build", "--platform", "linux/amd64"]
    assert f"BAKE_LIGHTNING={bake}" in called and called[called.index("-t") + 1] == f"me/worker:{tag}"


def test_the_dockerfile_bakes_lightning_only_when_asked_into_the_cache_the_loader_reads():
    import bake_lightning
    from config import IMAGE_HF_CACHE

    text = (ROOT / "Dockerfile").read_text()
    assert 'ARG BAKE_LIGHTNING=""' in text
    assert 'RUN if [ -n "$BAKE_LIGHTNING" ]; then python bake_lightning.py "$BAKE_LIGHTNING"; fi' in text
    assert IMAGE_HF_CACHE in Settings.from_env({}).hf_cache_dirs
    with pytest.raises(SystemExit, match="--bake-lightning takes steps from"):
        bake_lightning.bake("16")


def hub_manifest() -> dict:
    return json.loads((ROOT / ".runpod" / "hub.json").read_text())


def test_hub_offers_every_variable_with_configs_type_default_and_options():
    specs = variable_specs()
    entries = {entry["key"]: entry["input"] for entry in hub_manifest()["config"]["env"]}
    assert sorted(entries) == sorted([*specs, *LIBRARY_VARIABLES])
    for name, spec in specs.items():
        entry = entries[name]
        assert entry["type"] == spec.kind, name
        if spec.derived:  # MAX_CONCURRENCY follows MAX_BATCH_SIZE: a fixed default would undo that
            assert "default" not in entry, name
            continue
        # An empty string leaves the choice to the worker (MODEL_DIR follows the volume).
        assert entry["default"] == spec.default or (spec.kind == "string" and entry["default"] == ""), name
        if spec.options and name != "ATTENTION_BACKEND":  # diffusers has 30 backends; the hub names a few
            assert sorted(o["value"] for o in entry["options"]) == sorted(spec.options), name
        for option in entry.get("options", []):
            assert option["value"] in spec.options, (name, option)
        assert entry["description"].strip(), name


def test_hub_presets_are_valid_settings_and_fit_the_gpus_offered():
    config = hub_manifest()["config"]
    sizes = [int(re.search(r"_(\d+)", gpu).group(1)) for gpu in config["gpuIds"].split(",")]
    for preset in config["presets"]:
        Settings.from_env({key: str(value) for key, value in preset["defaults"].items()})  # raises if invalid
        claimed = [int(gb) for gb in re.findall(r"(\d+) GB", preset["name"])]
        assert all(gb <= min(sizes) for gb in claimed), (preset["name"], sizes)
    modes = {preset["defaults"]["PRECISION_MODE"] for preset in config["presets"]}
    assert modes == {"bf16", "fp8", "4bit"}


def test_runpod_test_manifest_uses_configs_variables():
    names = set(variable_names())
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    assert {entry["key"] for entry in tests["config"]["env"]} <= names
    assert tests["tests"] and all("prompt" in t["input"] for t in tests["tests"])
    for test in tests["tests"]:  # every test job is valid input for the worker
        schema.parse(test["input"], Settings.from_env({}))
    assert any(test["input"].get("loras") for test in tests["tests"])


def test_readme_documents_every_variable_and_the_test_command():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in variable_names() if f"`{name}`" not in readme]
    assert missing == []
    assert "make test" in readme and "make demo" in readme


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_benchmarks_name_the_pinned_versions_as_the_stack_measured():
    """The speed the README quotes comes from the stack the image installs."""
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    paragraph = benchmarks[benchmarks.index("**Versions.**"):].split("\n\n", 1)[0].replace("\n", " ")
    measured = dict(re.findall(r"([a-z_]+) (\d+\.\d+\.\d+)(?:\+cu\d+)?,", paragraph.split("(Pillow")[0]))
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))  # fmt: skip
    assert len(measured) >= 10
    assert {name: pins.get(name.replace("_", "-"), pins.get(name)) for name in measured} == measured
