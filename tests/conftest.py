"""Shared fixtures: tiny random diffusers pipelines (see tests/tiny.py), saved once per session.

``*_dir`` fixtures are folders on disk (for the loading path and the CLI); ``*_pipe`` fixtures are in-memory
pipelines built fresh for each test (cheap: < 0.1 s each once the imports are warm), so a test may mutate them.
"""

from __future__ import annotations

import os

import pytest
import tiny

# tests never reach the hub: a hub id must fail fast, not hang on the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lcm")
    tiny.tiny_lcm(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny.tiny_sd(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd_v")
    tiny.tiny_sd(folder, prediction_type="v_prediction")
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    tiny.tiny_sdxl(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    tiny.tiny_sd3(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A FLUX.1-dev-like FluxPipeline folder (guidance embedding)."""
    folder = tmp_path_factory.mktemp("tiny_flux")
    tiny.tiny_flux(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory):
    """A FluxPipeline folder whose transformer has no guidance embedding (schnell-like: true CFG)."""
    folder = tmp_path_factory.mktemp("tiny_flux_schnell")
    tiny.tiny_flux(folder, guidance_embeds=False)
    return folder


@pytest.fixture
def tiny_lcm_pipe():
    return _quiet(tiny.tiny_lcm())


@pytest.fixture
def tiny_sd_pipe():
    return _quiet(tiny.tiny_sd())


@pytest.fixture
def tiny_sd_v_pipe():
    return _quiet(tiny.tiny_sd(prediction_type="v_prediction"))


@pytest.fixture
def tiny_sdxl_pipe():
    return _quiet(tiny.tiny_sdxl())


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe
