"""Shipping files that cannot be run here (no Docker engine) are checked by reading them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from config import LIBRARY_VARIABLES, Settings, variable_names, variable_specs
from qwen_edit_worker.jobs import schema

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_PACKAGES = {"torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes",
                     "runpod", "pillow", "huggingface_hub", "pydantic"}  # fmt: skip


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    # A pin's environment marker (`; sys_platform == "linux"`) is left out: the pin is before it.
    return [line.split("#")[0].split(";")[0].strip() for line in lines if line.split("#")[0].strip()]


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
    assert re.search(r"^COPY \*\.py test_input\.json \./$", text, re.M)  # the top-level modules ship
    assert re.search(r"^COPY qwen_edit_worker \./qwen_edit_worker$", text, re.M)  # and the package
    # The start-up's files are listed once the code is in place (the listing imports it).
    listing = "RUN python -m qwen_edit_worker.startup.import_set"
    assert re.search(rf"^{re.escape(listing)}$", text, re.M) and text.index(listing) > text.index("COPY qwen_edit_worker")
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
    from config import IMAGE_HF_CACHE
    from qwen_edit_worker.startup import bake_lightning

    text = (ROOT / "Dockerfile").read_text()
    assert 'ARG BAKE_LIGHTNING=""' in text
    assert 'RUN if [ -n "$BAKE_LIGHTNING" ]; then python -m qwen_edit_worker.startup.bake_lightning "$BAKE_LIGHTNING"; fi' in text
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


def test_the_configuration_document_lists_every_variable_once_with_configs_default():
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `")]
    documented = [name.strip("|` ") for row in rows for name in row[0].split(", ")]
    assert sorted(documented) == sorted([*variable_names(), *LIBRARY_VARIABLES])  # each once
    defaults = {name.strip("|` "): row[1] for row in rows for name in row[0].split(", ")}
    for name, spec in variable_specs().items():
        if spec.kind != "string" and not spec.derived:  # a number or a switch: the default as config reads it
            shown = str(spec.default).lower() if spec.kind == "boolean" else f"{spec.default:.15g}"
            assert f"`{shown}`" in defaults[name], name


def test_the_readme_is_short_names_the_test_command_and_links_every_document():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "make test" in readme and "make demo" in readme
    for document in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{document.name})" in readme, document.name
    links = re.findall(r"\]\(([^)#]+\.md)", "".join(p.read_text() for p in (ROOT / "docs").glob("*.md")))
    assert all((ROOT / "docs" / link).resolve().exists() for link in links), links


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_benchmarks_name_the_pinned_versions_as_the_stack_measured():
    """The speed the README quotes comes from the stack the image installs."""
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    paragraph = benchmarks[benchmarks.index("**Versions.**"):].split("\n\n", 1)[0].replace("\n", " ")
    measured = dict(re.findall(r"([a-z][a-z0-9_-]*) (\d+\.\d+\.\d+)(?:\+cu\d+)?,", paragraph.split("(Pillow")[0]))
    pins = dict(line.split("==") for line in requirement_lines("requirements.txt"))
    assert len(measured) >= 10
    assert {name: pins.get(name.replace("_", "-"), pins.get(name)) for name in measured} == measured


def test_the_version_is_the_release_changes_names_first():
    import qwen_edit_worker

    first = re.search(r"^## (\S+)", (ROOT / "CHANGES.md").read_text(), re.M).group(1)
    assert first == qwen_edit_worker.__version__


def test_benchmarks_hold_current_results_under_headings_that_name_no_order_of_work():
    text = (ROOT / "BENCHMARKS.md").read_text()
    headings = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert not re.search(r"\b(session|current code|earlier|previous|before|again|first|second|third|fourth|fifth|sixth|"
                         r"seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth)\b", headings, re.I), headings  # fmt: skip
    assert "session" not in text.lower()
    commands = re.findall(r"benchmarks/(\w+\.py)", text)
    assert {c for c in commands if not (ROOT / "benchmarks" / c).exists()} <= {"png_levels.py"}  # removed, named with its commit
