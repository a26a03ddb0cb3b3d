"""Refactors change no result: the README examples (and a few more runs covering every method, SD2, SDXL, a
prompt list, a non-square size, checkpointing and the attention observer) on the tiny models give bit-identical
latents, per-step losses and attention maps to the hashes recorded before the model-seam refactor (#11).

The hashes were recorded with torch 2.13.0+cpu on the project's 2-core x86_64 machine (CI's), with 2 intra-op
threads. Floating-point results of the same code can differ on another torch build, CPU or thread count (a
reduction split over 1 thread sums in another order), so the test pins 2 threads and runs only there; regenerate
with ``python -m tests.test_no_change`` after a change that is meant to change results, and say why.
"""

from __future__ import annotations

import hashlib
import json
import platform

import pytest
import torch

import attncontrol
from attncontrol import AStar, AttendExcite, Refocus, Regulate

BOXES = {"cat": (0.05, 0.2, 0.5, 0.9), "dog": (0.55, 0.2, 0.95, 0.9)}

CASES = {
    # README "Python": A&E on SD 1.x, the seed of the example, thresholds at 0 and 10 reached
    "readme_attend_excite": ("sd1", "a cat and a frog", lambda: [AttendExcite(subjects=["cat", "frog"])],
                             dict(num_inference_steps=12, seed=6141)),
    # README "Methods": A&E + Refocus
    "readme_methods": ("sd1", "a cat and a dog", lambda: [AttendExcite(subjects=["cat", "dog"]), Refocus(boxes=BOXES)],
                       dict(num_inference_steps=6)),
    # README "Attention maps": the observer during an A&E run
    "readme_attention": ("sd1", "a cat and a frog", lambda: [AttendExcite(subjects=["cat", "frog"])],
                         dict(num_inference_steps=12, attention=True)),
    # README "SDXL": A&E on the stock SDXL pipeline (Euler)
    "readme_sdxl": ("sdxl", "a cat and a frog", lambda: [AttendExcite(subjects=["cat", "frog"])],
                    dict(num_inference_steps=4)),
    "astar_sd2": ("sd2", "a cat and a dog", lambda: [AStar(subjects=["cat", "dog"], max_iter_to_alter=4)],
                  dict(num_inference_steps=6)),
    "regulate_sd1": ("sd1", "a cat and a dog", lambda: [Regulate(subjects=["cat", "dog"])],
                     dict(num_inference_steps=6, attention=True)),
    "all_four_sdxl": ("sdxl", "a cat and a dog", lambda: [AttendExcite(subjects=["cat", "dog"]),
                      AStar(subjects=["cat", "dog"]), Refocus(boxes=BOXES), Regulate(subjects=["cat", "dog"])],
                      dict(num_inference_steps=5, guidance_scale=6.0)),
    "prompt_list_sd1": ("sd1", ["a cat and a dog", "a bird and a bear"],
                        lambda: [AttendExcite(subjects=[["cat", "dog"], ["bird", "bear"]], thresholds={0: 0.3})],
                        dict(num_inference_steps=4, num_images_per_prompt=2)),
    "non_square_checkpointing_sd1": ("sd1", "a cat and a dog", lambda: [AttendExcite(subjects=["cat", "dog"])],
                                     dict(num_inference_steps=4, height=48, width=80, checkpointing=True)),
    "plain_sdxl": ("sdxl", "a cat and a dog", lambda: [], dict(num_inference_steps=3, attention=["cat", "dog"])),
}  # fmt: skip

EXPECTED = {
    "readme_attend_excite": "3f5dd060dd1d487ee6e5bdbbcadf1f05fd8eea4950bde8a6c130ec21c2c3c705",
    "readme_methods": "6b11ecbedabbcf99dbf31193119d8439d81e922fcbde6af8d7795194e302ff62",
    "readme_attention": "2661f9b8f469c370efe8f35930d8b5c613335581843ab2b9640f231a989653c0",
    "readme_sdxl": "0b3101f927254db207ea6e1d4cea104203247a62cab90c69fdcf8aa1ae186067",
    "astar_sd2": "3ea13e57a2a487999d40bf763c7c974d7f1753f592cca073e9f1c0ba87240547",
    "regulate_sd1": "41d13db7ab5740df0f169c24659806ad319bee063255372eb081876342d681e7",
    "all_four_sdxl": "72f08eb34cd11eeab6cc0f8083984b015abfdc0c541d2e29edd02723081370e8",
    "prompt_list_sd1": "65987c02725858c6926fca006e3d66ef9d4c9df90b793bef2bdc1b8d966dcbb5",
    "non_square_checkpointing_sd1": "18a7ef87974fb3bc08840d1af0af417cd0e4b7bbb5609a4b446fb984cf0294d3",
    "plain_sdxl": "9845cb9af4f1f56a60fcd0563d12460dff064e4fb2fc14a1b1c259143005ab1a",
}


def _digest(out) -> str:
    h = hashlib.sha256()
    h.update(out.images.detach().to(torch.float32).contiguous().numpy().tobytes())
    # values in the controls' order, not their names (a method's name may change, not its numbers)
    steps = [(r.index, r.loss, r.initial_loss, r.refinement_iterations, r.updated, list(r.losses.values()),
              [sorted(v.items()) for v in r.edits.values()]) for r in out.trace]  # fmt: skip
    h.update(json.dumps(steps, default=repr).encode())
    if out.attention is not None:
        h.update(out.attention.maps.to(torch.float32).contiguous().numpy().tobytes())
        h.update(out.attention.raw.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def run_case(pipes, name: str) -> str:
    family, prompt, controls, kwargs = CASES[name]
    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", 0)
    out = attncontrol.generate(
        pipes[family], prompt, controls(), generator=torch.Generator().manual_seed(seed), output_type="latent",
        **kwargs,
    )  # fmt: skip
    return _digest(out)


def _reference_machine() -> bool:
    return torch.__version__ == "2.13.0+cpu" and platform.machine() == "x86_64"


@pytest.mark.skipif(not _reference_machine(), reason="hashes recorded with torch 2.13.0+cpu on x86_64")
@pytest.mark.parametrize("name", list(CASES))
def test_results_are_bit_identical(sd1, sd2, sdxl, name):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as recorded, whatever OMP_NUM_THREADS this run was given
    try:
        assert run_case({"sd1": sd1, "sd2": sd2, "sdxl": sdxl}, name) == EXPECTED[name]
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # print the hashes (regenerate deliberately, never to make a failing test pass)
    import tempfile
    import warnings
    from pathlib import Path

    from .conftest import _load

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)  # the thread count the hashes are recorded with
    from diffusers import StableDiffusionXLPipeline

    from attncontrol.testing import save_tiny_sd_pipeline

    root = Path(tempfile.mkdtemp())
    dirs = {f: save_tiny_sd_pipeline(root / f, family=f, seed=s) for f, s in (("sd1", 0), ("sd2", 1), ("sdxl", 2))}

    def fresh():  # as the test fixtures do: a freshly loaded pipeline per case
        pipes = {"sd1": _load(dirs["sd1"]), "sd2": _load(dirs["sd2"])}
        pipes["sdxl"] = StableDiffusionXLPipeline.from_pretrained(dirs["sdxl"], use_safetensors=True)
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
        return pipes

    print("EXPECTED = {")
    for case in CASES:
        print(f"    {case!r}: {run_case(fresh(), case)!r},")
    print("}")
