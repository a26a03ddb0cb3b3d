"""The model seam holds: family facts live only in ``attncontrol/models/``.

The generic parts (the run, the guidance engine, the capture processors, the store, gradient checkpointing,
the controls, the losses, the text layout, the attention observer, the Modular Diffusers blocks) must not name a
family's modules, its latent scaling or its tokenizer's word marker. Adding a family is then one adapter module.

The other side of the seam: the attention ops (processors/classic.py, processors/joint.py) read diffusers' attention
layers by attribute and argument name; those words must still exist in the installed diffusers, and mean the same.
"""

import ast
import inspect
import math
import re
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "attncontrol"
GENERIC = [
    "pipeline.py",
    "run.py",
    "guidance.py",
    "processors",
    "store.py",
    "checkpointing.py",
    "controls",
    "losses",
    "text.py",
    "attention.py",
    "modular",
]
FAMILY_WORDS = ["unet", "down_blocks", "up_blocks", "mid_block", "attn1", "attn2", "</w>", "init_noise_sigma"]


def _files():
    for entry in GENERIC:
        path = PACKAGE / entry
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_generic_code_names_no_family_fact(path):
    text = path.read_text(encoding="utf-8")
    found = sorted({w for w in FAMILY_WORDS if re.search(re.escape(w), text, flags=re.IGNORECASE)})
    assert not found, f"{path.name} names {found}: move that knowledge into attncontrol/models/"


def test_the_grep_sees_the_words_where_they_belong():
    """The check is not vacuous: the SD adapter's UNet module names every family word it knows."""
    text = (PACKAGE / "models" / "unet.py").read_text(encoding="utf-8")
    assert all(w in text for w in ("down_blocks", "up_blocks", "mid_block", "attn1", "attn2"))
    assert "</w>" in (PACKAGE / "tokens.py").read_text(encoding="utf-8")


# -- the other side of the seam: the diffusers words the attention ops read ------------------------------------
# processors/joint.py reads SD3's joint ``Attention`` (JointAttnProcessor2_0, the MMDiT blocks) and FLUX's
# ``FluxAttention`` (FluxAttnProcessor) by attribute name, and the layer's call by its processor's parameter names
# (the capture processor binds the call to the original processor's signature); processors/classic.py reads the
# UNet's ``Attention`` (AttnProcessor2_0). Each kind of layer is built here as diffusers' own blocks build it (tiny,
# float64): a diffusers upgrade that renames a word fails with the word, the layer and diffusers' version.

SD3_WORDS = ("heads", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out")
SD3_TEXT_WORDS = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
FLUX_WORDS = ("head_dim", "to_q", "to_k", "to_v", "norm_q", "norm_k", "added_kv_proj_dim", "fused_projections")
FLUX_TEXT_WORDS = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k", "to_out")
FUSED_WORDS = ("to_qkv", "to_added_qkv")  # after fuse_projections(); the second with a text stream only
CLASSIC_WORDS = (
    "heads",
    "scale",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "group_norm",
    "spatial_norm",
    "norm_cross",
    "residual_connection",
    "rescale_output_factor",
    "prepare_attention_mask",
    "head_to_batch_dim",
    "batch_to_head_dim",
    "get_attention_scores",
    "norm_encoder_hidden_states",
)
JOINT_ARGUMENTS = ("hidden_states", "encoder_hidden_states")
FLUX_ARGUMENTS = (*JOINT_ARGUMENTS, "image_rotary_emb")
# name: (the layer's words, the processor parameters read by name, the ops that serve it, its token streams)
DIFFUSERS_LAYERS = {
    "sd3-joint": (SD3_WORDS + SD3_TEXT_WORDS, JOINT_ARGUMENTS, "JOINT", "text"),
    "sd35-joint-qk-norm": (SD3_WORDS + SD3_TEXT_WORDS, JOINT_ARGUMENTS, "JOINT", "text"),
    "sd35-image-only": (SD3_WORDS, JOINT_ARGUMENTS, "JOINT", "image"),
    "flux-double": (FLUX_WORDS + FLUX_TEXT_WORDS, FLUX_ARGUMENTS, "ROTARY_JOINT", "text"),
    "flux-double-fused": (FLUX_WORDS + FLUX_TEXT_WORDS + FUSED_WORDS, FLUX_ARGUMENTS, "ROTARY_JOINT", "text"),
    "flux-single": (FLUX_WORDS, FLUX_ARGUMENTS, "ROTARY_JOINT", "single"),
    "flux-single-fused": (FLUX_WORDS + FUSED_WORDS[:1], FLUX_ARGUMENTS, "ROTARY_JOINT", "single"),
    "unet-cross": (CLASSIC_WORDS, (*JOINT_ARGUMENTS, "attention_mask", "temb"), "CLASSIC", "text"),
}


def _diffusers_layer(name: str):
    """The attention module diffusers' own block makes for ``name`` (2 heads of 8 channels), seeded, float64."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.manual_seed(0)
    if name.startswith("sd3"):
        block = JointTransformerBlock(
            16,
            2,
            8,
            qk_norm="rms_norm" if "qk-norm" in name or "image" in name else None,
            use_dual_attention=name.startswith("sd35"),
        )
        attn = block.attn2 if "image-only" in name else block.attn
    elif name.startswith("flux"):
        block = (FluxTransformerBlock if "double" in name else FluxSingleTransformerBlock)(16, 2, 8)
        attn = block.attn
        if name.endswith("fused"):
            attn.fuse_projections()
    else:  # the SD UNet's cross-attention (attn2 of its transformer blocks)
        attn = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12).attn2
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms' scales off 1
    return attn.double().eval()


def _missing_words(name: str, attn) -> list[str]:
    words, params, _, _ = DIFFUSERS_LAYERS[name]
    call = type(attn.processor).__call__
    signature = inspect.signature(call).parameters
    missing = [w for w in words if not hasattr(attn, w)]
    missing += [f"{type(attn.processor).__name__}.__call__({p}=...)" for p in params if p not in signature]
    return missing


@pytest.mark.parametrize("name", list(DIFFUSERS_LAYERS))
def test_diffusers_still_has_the_attention_words_the_ops_read(name):
    import diffusers

    attn = _diffusers_layer(name)
    missing = _missing_words(name, attn)
    ops = "processors/classic.py" if DIFFUSERS_LAYERS[name][2] == "CLASSIC" else "processors/joint.py"
    assert not missing, (
        f"diffusers {diffusers.__version__}: the {name} layer ({type(attn).__name__} with "
        f"{type(attn.processor).__name__}) has no {missing}, which {ops} reads: follow the rename there"
    )


def test_diffusers_rotary_embedding_keeps_its_sequence_dim():
    import diffusers
    from diffusers.models.embeddings import apply_rotary_emb

    assert "sequence_dim" in inspect.signature(apply_rotary_emb).parameters, (
        f"diffusers {diffusers.__version__}: apply_rotary_emb(..., sequence_dim=) is gone; processors/joint.py "
        "(RotaryJointAttention.query_key) passes it"
    )


def _attention_words_read(path: Path) -> set[str]:
    """Every ``attn.WORD`` and ``getattr(attn, "WORD", ...)`` in a module's source."""
    words = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "attn":
            words.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "attn"
            and isinstance(node.args[1], ast.Constant)
        ):
            words.add(node.args[1].value)
    return words


@pytest.mark.parametrize("ops", ["joint.py", "classic.py"])
def test_the_word_lists_cover_every_word_the_ops_read(ops):
    """Not vacuous, and not stale: every attribute the ops read from a layer is in a list checked above."""
    listed = {w for words, *_ in DIFFUSERS_LAYERS.values() for w in words}
    read = _attention_words_read(PACKAGE / "processors" / ops)
    assert read and not read - listed, f"processors/{ops} reads {sorted(read - listed)}: add them to the lists above"


@pytest.mark.parametrize("name", [n for n, spec in DIFFUSERS_LAYERS.items() if spec[2] != "CLASSIC"])
def test_the_joint_ops_read_the_words_as_diffusers_means_them(name):
    """The words mean what the ops take them for: attention formed from the ops' queries, keys and values, in
    their token order (SD3: image tokens first; FLUX: text first), is the layer's own output from diffusers'
    processor (double-stream layers: image and text through their output projections; single-stream: as is)."""
    import diffusers

    from attncontrol.processors import joint

    attn = _diffusers_layer(name)
    ops, streams = getattr(joint, DIFFUSERS_LAYERS[name][2]), DIFFUSERS_LAYERS[name][3]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    args = {"hidden_states": hidden}
    if streams == "text":
        args["encoder_hidden_states"] = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)
    if name.startswith("flux"):
        args["image_rotary_emb"] = tuple(
            torch.randn(2, 6 + (4 if streams == "text" else 0), 8, generator=g, dtype=torch.float64)
        )
    with torch.no_grad():
        theirs = attn.processor(attn, **args)
        q, k, text_len = ops.query_key(attn, args)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (probs @ ops.values(attn, args)).transpose(1, 2).flatten(2)  # (batch, tokens, channels)
        if streams == "text":
            img, start = ops.split(out.shape[1], text_len)
            ours = (attn.to_out[0](out[:, img]), attn.to_add_out(out[:, start : start + text_len]))
        else:
            ours = (attn.to_out[0](out),) if streams == "image" else (out,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    assert len(theirs) == len(ours), f"diffusers {diffusers.__version__}: {name} returns {len(theirs)} outputs"
    for a, b, what in zip(ours, theirs, ("image", "text")):
        torch.testing.assert_close(
            a,
            b,
            rtol=1e-10,
            atol=1e-12,
            msg=lambda m, what=what: (
                f"diffusers {diffusers.__version__}, {name}: the {what} output differs from the attention the ops "
                f"form: {m}"
            ),
        )
