from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from attncontrol.testing import make_clip_tokenizer, save_tiny_sd_pipeline  # noqa: E402

# A cap on any one child process of a test, not a measure of speed: a CLI run that takes 20 s on a quiet 2-core
# machine took over 300 s on a loaded one. Tests wait for a readiness condition, never for a fixed time.
SUBPROCESS_TIMEOUT = 900


def _load(folder, **kwargs):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Each test starts from the same global random state, whichever worker runs it and whatever ran before
    (pytest-xdist spreads tests over workers in no fixed order): noise drawn without a generator is reproducible."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny SD1- and SD2-family pipelines saved to disk (safetensors), so tests use the real loading code."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "sd1": save_tiny_sd_pipeline(root / "sd1", family="sd1", seed=0),
        "sd2": save_tiny_sd_pipeline(root / "sd2", family="sd2", seed=1),
        "sdxl": save_tiny_sd_pipeline(root / "sdxl", family="sdxl", seed=2),
    }


def fresh_copy(pipe):
    """A new pipeline over deep copies of ``pipe``'s modules and a new scheduler of the same config; the tokenizers
    are shared (read-only). What a test does to its copy (dtype, scheduler, hooks, processors) cannot reach another
    test, and no test pays for a load from disk: each family is loaded with ``from_pretrained`` once per session."""
    import copy
    import inspect

    parts = {}
    for name, value in pipe.components.items():
        if isinstance(value, torch.nn.Module):
            parts[name] = copy.deepcopy(value)
        elif hasattr(value, "set_timesteps"):
            parts[name] = type(value).from_config(value.config)
        else:
            parts[name] = value
    params = inspect.signature(type(pipe).__init__).parameters
    parts.update({k: v for k, v in pipe.config.items() if k in params and k not in parts})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clone = type(pipe)(**parts)
    clone.register_to_config(_name_or_path=pipe.config.get("_name_or_path"))
    clone.set_progress_bar_config(disable=True)
    return clone


@pytest.fixture(scope="session")
def _loaded(tiny_dirs):
    """Each tiny family loaded from its folder once (the real loading code); tests get fresh copies."""
    from diffusers import StableDiffusionXLPipeline

    pipes = {"sd1": _load(tiny_dirs["sd1"]), "sd2": _load(tiny_dirs["sd2"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipes["sdxl"] = StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"], use_safetensors=True)
    return pipes


@pytest.fixture()
def sd1(_loaded):
    return fresh_copy(_loaded["sd1"])


@pytest.fixture()
def sd2(_loaded):
    return fresh_copy(_loaded["sd2"])


@pytest.fixture()
def sdxl(_loaded):
    return fresh_copy(_loaded["sdxl"])


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


def diffusers_max_attention(pipe, latents, timestep, prompt: str, indices: list[int], attn_res=(16, 16)) -> list:
    """Each token's smoothed peak attention as diffusers' Attend-and-Excite pipeline measures it (its own store,
    processors and ``_aggregate_and_get_max_attention_per_token``) for a conditional forward of ``latents``: an
    independent measure of what A&E maximises. The pipeline's processors are put back afterwards."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (  # noqa: E501
        AttentionStore,
    )

    ref = ae_reference(pipe)
    saved = dict(pipe.unet.attn_processors)
    ref.attention_store = AttentionStore(attn_res)
    ref.register_attention_control()
    try:
        with torch.no_grad():
            cond, _ = ref.encode_prompt(prompt, latents.device, 1, False)
        with torch.enable_grad():  # its processors store maps only while a gradient is being recorded
            leaf = latents.detach().to(pipe.unet.dtype).requires_grad_(True)
            pipe.unet(leaf, timestep, encoder_hidden_states=cond)
            return [float(v.detach()) for v in ref._aggregate_and_get_max_attention_per_token(indices)]
    finally:
        pipe.unet.set_attn_processor(saved)


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


@pytest.fixture(scope="session")
def _loaded_mmdit(mmdit_dirs):
    return {family: load_mmdit(folder) for family, folder in mmdit_dirs.items()}


@pytest.fixture()
def sd3(_loaded_mmdit):
    return fresh_copy(_loaded_mmdit["sd3"])


@pytest.fixture()
def sd35(_loaded_mmdit):
    return fresh_copy(_loaded_mmdit["sd35"])


@pytest.fixture()
def flux(_loaded_mmdit):
    return fresh_copy(_loaded_mmdit["flux"])
