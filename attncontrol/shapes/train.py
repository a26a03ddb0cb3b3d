"""Training the shapes model: a stock ``StableDiffusionPipeline`` (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel, PNDM scheduler) learned from scratch on the shapes world, seeded and reproducible.

Recipe (``python -m attncontrol.shapes train --out DIR``):

1. the tokenizer: a CLIP byte-level BPE whose merges make every word of the world one token (with CLIP's
   ``</w>`` end-of-word marker, so subjects resolve as on SD); any other word still tokenises, byte by byte;
2. a fixed training set of ``--images`` scenes drawn from :data:`~attncontrol.shapes.world.TRAINING_MIX`, with
   the held-out object pairs (:func:`~attncontrol.shapes.world.held_out_pairs`) never shown together;
3. the VAE (64x64 pixels -> 4x16x16 latents) on reconstruction (MSE + L1) plus a small KL term; its
   ``scaling_factor`` is 1 / the latents' standard deviation, as SD's 0.18215;
4. the UNet and the text encoder together, on SD's noise schedule (scaled-linear betas, epsilon prediction),
   min-SNR-5 loss weights, captions dropped to "" one time in ten (for classifier-free guidance), AdamW with a
   warm-up and a cosine decay, and an exponential moving average of both models (the EMA is what ships).

The log (``training_log.csv``: stage, step, loss, seconds) is written as training goes; the folder appears only
when the pipeline is complete (written to a temporary folder, then renamed).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import world

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


# ---------------------------------------------------------------------------------------------------- tokenizer


def _byte_chars() -> list[str]:
    from ..testing.vocab import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``words`` (each counted once) until every word is one symbol: the most frequent
    adjacent pair first, ties broken alphabetically. Replaying them in rank order (as CLIP's tokenizer does)
    rebuilds each word whole."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(tuple(out))
        seqs = new
    return merges


def write_tokenizer(folder: str | Path):
    """The world's CLIP tokenizer (``vocab.json``, ``merges.txt``, config) in ``folder``; returns it loaded."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = bpe_merges(world.vocabulary())
    base = _byte_chars()
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [SOT, EOT]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, indent=0), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "\n".join(["#version: 0.2"] + [" ".join(m) for m in merges]) + "\n", encoding="utf-8"
    )
    tok = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=77,
        bos_token=SOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
    )
    tok.save_pretrained(str(folder))
    return tok


# ---------------------------------------------------------------------------------------------------- models


def make_models(vocab_size: int, bos: int, eos: int, seed: int = 0):
    """The untrained VAE, text encoder and UNet (configs of the shipped model)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.SIZE,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=2,
        norm_num_groups=16,
    )
    return vae, text, unet


def scheduler_config() -> dict:
    """SD 1.5's noise schedule (the shipped scheduler is PNDM, as SD 1.5's)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )


# ---------------------------------------------------------------------------------------------------- data


def render_set(n: int, seed: int, progress: bool = True) -> tuple[np.ndarray, list[str], list[world.Scene]]:
    """``n`` training scenes: uint8 images (n, 64, 64, 3), captions, scenes."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    exclude = world.held_out_pairs()
    images = np.empty((n, world.SIZE, world.SIZE, 3), np.uint8)
    captions, scenes = [], []
    for i in tqdm(range(n), desc="drawing scenes", disable=not progress, mininterval=2):
        scene = world.training_scene(rng, exclude)
        images[i] = np.asarray(world.draw(scene))
        captions.append(scene.caption)
        scenes.append(scene)
    return images, captions, scenes


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _Log:
    def __init__(self, path: Path):
        self.fh = path.open("w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.fh)
        self.writer.writerow(["stage", "step", "loss", "lr", "seconds"])
        self.start = time.perf_counter()

    def row(self, stage: str, step: int, loss: float, lr: float) -> None:
        self.writer.writerow([stage, step, f"{loss:.6f}", f"{lr:.3g}", f"{time.perf_counter() - self.start:.1f}"])
        self.fh.flush()


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _ema_update(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


# ---------------------------------------------------------------------------------------------------- stages


def train_vae(
    vae,
    images: np.ndarray,
    steps: int,
    batch: int,
    rng: np.random.Generator,
    log: _Log,
    progress: bool = True,
    lr: float = 1e-3,
):
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc="VAE", disable=not progress, mininterval=2)
    for step in bar:
        x = _to_tensor(images[rng.integers(len(images), size=batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        rec = (recon - x).pow(2).mean() + 0.5 * (recon - x).abs().mean()
        loss = rec + 1e-6 * posterior.kl().mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log.row("vae", step, float(rec.detach()), opt.param_groups[0]["lr"])
            bar.set_postfix(recon=f"{float(rec.detach()):.4f}")
    vae.eval()
    return vae


def encode_all(vae, images: np.ndarray, batch: int = 256):
    """The posterior means and standard deviations of every image (sampled per training step)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            dist = vae.encode(_to_tensor(images[i : i + batch])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _noise_schedule():
    """The training noise schedule (DDPM on the sampler's betas), its cumulative alphas, and min-SNR-5 loss weights
    for epsilon prediction."""
    import torch
    from diffusers.schedulers.scheduling_ddpm import (
        DDPMScheduler,  # its module: diffusers' top level is typed as a dummy
    )

    ddpm_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k in ddpm_keys})
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    return sched, alphas, torch.clamp(snr, max=5.0) / snr


def _caption_ids(tokenizer, captions: list[str]):
    """The captions' token ids, padded to the tokenizer's length, and the empty caption's (caption dropout)."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    return ids, empty


def _frozen_copy(model):
    """A copy for the exponential moving average: in eval mode, no gradients."""
    copied = copy.deepcopy(model).eval()
    copied.requires_grad_(False)
    return copied


def train_denoiser(
    unet,
    text,
    tokenizer,
    means,
    stds,
    captions: list[str],
    scaling: float,
    steps: int,
    batch: int,
    rng: np.random.Generator,
    log: _Log,
    progress: bool = True,
    lr: float = 1e-3,
    drop: float = 0.1,
    ema_decay: float = 0.999,
    checkpoint=None,
    every: int = 1000,
):
    import torch
    from tqdm.auto import tqdm

    sched, alphas, weights = _noise_schedule()
    ids, empty = _caption_ids(tokenizer, captions)
    ema_unet, ema_text = _frozen_copy(unet), _frozen_copy(text)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    unet.train()
    text.train()
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    bar = tqdm(range(steps), desc="UNet + text encoder", disable=not progress, mininterval=2)
    for step in bar:
        idx = torch.from_numpy(rng.integers(len(captions), size=batch))
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        tokens = ids[idx].clone()
        tokens[torch.from_numpy(rng.random(batch) < drop)] = empty[0]
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        cond = text(tokens)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * weights[t]).mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text, decay)
        if step % 25 == 0 or step == steps - 1:
            log.row("unet", step, float(per.detach().mean()), opt.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{float(per.detach().mean()):.4f}")
        if checkpoint is not None and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint(step + 1, ema_unet, ema_text)
    return ema_unet, ema_text


def _work_folder(out: Path) -> Path:
    """``out.partial``, where training writes until it renames it to ``out``; refuses a used ``out`` and a
    ``.partial`` left by another training (running, or stopped)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists (and is a file or not empty); pick a new --out")
    work = out.with_name(out.name + ".partial")
    if work.exists():
        raise FileExistsError(
            f"{work} exists: another training into {out} is running, or one stopped; delete that folder to start again"
        )
    return work


def _save_pipeline(work: Path, vae, text, tokenizer, unet) -> None:
    """The trained parts as a diffusers pipeline folder (safetensors), sampling with PNDM."""
    from diffusers import PNDMScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,  # its module: diffusers' top level is typed as a dummy
    )

    # diffusers annotates scheduler as the KarrasDiffusionSchedulers enum (it takes a scheduler instance) and the
    # safety checker and feature extractor as required (its docs and requires_safety_checker=False allow None)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**scheduler_config()),  # type: ignore[arg-type]
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(work), safe_serialization=True)


def _write_recipe(work: Path, recipe: dict, seconds: float, scaling: float) -> None:
    """training.json: the arguments, the threads and time it took, torch's version, the VAE's scaling factor, the
    training mix and the held-out pairs."""
    import torch

    held = sorted(sorted(world.object_name(o) for o in p) for p in world.held_out_pairs())
    recipe = dict(
        recipe,
        threads=torch.get_num_threads(),
        seconds=seconds,
        torch=torch.__version__,
        scaling_factor=scaling,
        mix=world.TRAINING_MIX,
        held_out_pairs=held,
    )
    (work / "training.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")


def train(
    out: str | Path,
    images: int = 30000,
    vae_steps: int = 400,
    steps: int = 4000,
    batch: int = 32,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Train the shapes model into ``out`` (a diffusers pipeline folder, safetensors). Returns the folder."""
    import torch

    out = Path(out)
    work = _work_folder(out)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    work.mkdir(parents=True)
    log = _Log(work / "training_log.csv")
    started = time.perf_counter()
    tokenizer = write_tokenizer(work / "tokenizer")
    vae, text, unet = make_models(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, seed)
    pixels, captions, _ = render_set(images, seed, progress)
    train_vae(vae, pixels, vae_steps, 16, rng, log, progress)
    means, stds = encode_all(vae, pixels)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(str(work / "vae"), safe_serialization=True)

    def checkpoint(step, ema_unet, ema_text):  # the EMA so far, to look at while training goes on
        ema_unet.save_pretrained(str(work / f"checkpoint-{step}" / "unet"), safe_serialization=True)
        ema_text.save_pretrained(str(work / f"checkpoint-{step}" / "text_encoder"), safe_serialization=True)

    unet, text = train_denoiser(
        unet, text, tokenizer, means, stds, captions, scaling, steps, batch, rng, log, progress, checkpoint=checkpoint
    )
    for old in work.glob("checkpoint-*"):
        shutil.rmtree(old)
    _save_pipeline(work, vae, text, tokenizer, unet)
    recipe = dict(images=images, vae_steps=vae_steps, steps=steps, batch=batch, seed=seed)
    _write_recipe(work, recipe, round(time.perf_counter() - started, 1), scaling)
    log.fh.close()
    if out.exists():
        out.rmdir()
    work.rename(out)
    return out
