"""The model seam holds: family facts live only in ``attncontrol/models/``.

The generic parts (the run, the guidance engine, the capture processors, the store, gradient checkpointing,
the controls, the losses, the text layout and the attention observer) must not name a family's modules, its latent
scaling or its tokenizer's word marker. Adding a family is then one adapter module.
"""

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attncontrol"
GENERIC = ["pipeline.py", "run.py", "guidance.py", "processors", "store.py", "checkpointing.py", "controls",
           "losses", "text.py", "attention.py"]  # fmt: skip
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
