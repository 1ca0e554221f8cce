"""The install extras name the real GPU packages, in the ranges megatron-core itself accepts.

Read from the installed distribution's metadata (the editable install `make test` performs), so
what is checked is what pip would resolve."""

from importlib import metadata

import pytest
from packaging.requirements import Requirement


def _extra_requirements(dist: str, extra: str) -> list[Requirement]:
    out = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and req.marker.evaluate({"extra": extra}):
            out.append(req)
    return out


def test_gpu_extra_names_no_unrelated_apex():
    names = {r.name.lower() for r in _extra_requirements("megatron_qwen", "gpu")}
    # PyPI's "apex" is a 2013 Pyramid toolkit; NVIDIA apex only installs from source (README).
    assert "apex" not in names
    assert {"transformer-engine", "flash-attn"} <= names


def test_transformer_engine_range_is_inside_megatron_cores():
    ours = next(r for r in _extra_requirements("megatron_qwen", "gpu") if r.name == "transformer-engine")
    theirs = [r for r in _extra_requirements("megatron-core", "dev") if r.name == "transformer-engine"]
    if not theirs:
        pytest.skip("this megatron-core declares no transformer-engine range")
    probe = ["2.8.0", "2.9.0", "2.10.0", "2.11.0", "2.11.9", "2.12.0", "2.15.0", "2.20.0"]
    allowed_by_us = [v for v in probe if ours.specifier.contains(v, prereleases=True)]
    assert allowed_by_us, f"{ours} admits none of {probe}"
    for v in allowed_by_us:
        assert theirs[0].specifier.contains(v, prereleases=True), (
            f"transformer-engine {v} is allowed by our gpu extra ({ours.specifier}) but not by "
            f"megatron-core ({theirs[0].specifier})")


def test_megatron_core_range_is_the_one_the_version_shims_cover():
    """setup.py's megatron-core range is runtime.mcore_version.SUPPORTED, and the installed
    megatron-core is inside it (read from setup.py: the installed metadata lags an edit)."""
    from megatron_qwen.runtime import mcore_version
    from tests.dist import REPO

    assert f'"megatron-core{mcore_version.SUPPORTED}"' in (REPO / "setup.py").read_text()
    assert mcore_version.is_supported(), mcore_version.version()
