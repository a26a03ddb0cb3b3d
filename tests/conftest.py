from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from attncontrol.testing import make_clip_tokenizer, save_tiny_sd_pipeline  # noqa: E402


def _load(folder, **kwargs):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny SD1- and SD2-family pipelines saved to disk (safetensors), so tests use the real loading code."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "sd1": save_tiny_sd_pipeline(root / "sd1", family="sd1", seed=0),
        "sd2": save_tiny_sd_pipeline(root / "sd2", family="sd2", seed=1),
        "sdxl": save_tiny_sd_pipeline(root / "sdxl", family="sdxl", seed=2),
    }


@pytest.fixture()
def sd1(tiny_dirs):
    return _load(tiny_dirs["sd1"])


@pytest.fixture()
def sd2(tiny_dirs):
    return _load(tiny_dirs["sd2"])


@pytest.fixture()
def sdxl(tiny_dirs):
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tokenizer():
    return make_clip_tokenizer()


@pytest.fixture(scope="session")
def sd2_tokenizer():
    return make_clip_tokenizer(sd2=True)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ae_reference(pipe):
    """diffusers' deprecated Attend-and-Excite pipeline over the same components: the oracle."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionAttendAndExcitePipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    return ref


def processor_snapshot(unet):
    return {name: id(proc) for name, proc in unet.attn_processors.items()}


@pytest.fixture(scope="session")
def mmdit_dirs(tmp_path_factory):
    """Tiny SD3, SD3.5-style (dual attention) and FLUX pipelines saved to disk (safetensors)."""
    root = tmp_path_factory.mktemp("tiny-mmdit")
    return {f: save_tiny_sd_pipeline(root / f, family=f, seed=s) for f, s in (("sd3", 3), ("sd35", 4), ("flux", 5))}


def load_mmdit(folder):
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def sd3(mmdit_dirs):
    return load_mmdit(mmdit_dirs["sd3"])


@pytest.fixture()
def sd35(mmdit_dirs):
    return load_mmdit(mmdit_dirs["sd35"])


@pytest.fixture()
def flux(mmdit_dirs):
    return load_mmdit(mmdit_dirs["flux"])
