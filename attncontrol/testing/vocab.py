"""Offline tokenizers with real vocabularies: CLIP's (rebuilt from the BPE file the ``open-clip-torch`` wheel
ships; its ids equal Stable Diffusion's) and a T5-style sentencepiece unigram tokenizer trained on CLIP's words."""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"


def clip_bpe_path() -> Path:
    """Locate the CLIP BPE vocabulary shipped inside the open-clip-torch wheel, without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The offline CLIP tokenizer needs the vocabulary file shipped by open-clip-torch; install it with "
            "`pip install --no-deps open-clip-torch` (its dependencies would replace a CPU torch)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"open_clip is installed but {path} is missing")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character table used by GPT-2/CLIP byte-level BPE.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP ViT-L/14 tokenizer (49408 tokens) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return folder


@lru_cache(maxsize=1)
def _tokenizer_files_dir() -> Path:
    import tempfile

    return write_clip_tokenizer_files(Path(tempfile.mkdtemp(prefix="attncontrol-clip-tok-")))


def make_clip_tokenizer(sd2: bool = False):
    """A real CLIP tokenizer built offline. ``sd2=True`` pads with "!" (id 0) like SD 2.x's tokenizer."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_files_dir()
    kwargs = {"pad_token": "!"} if sd2 else {"pad_token": EOT_TOKEN}
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=77,
        bos_token=SOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        **kwargs,
    )


def _clip_words() -> list[str]:
    """The whole words of CLIP's BPE vocabulary (alphabetic merges that end a word)."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    words = {"".join(line.split()).removesuffix("</w>") for line in lines if line.strip().endswith("</w>")}
    return sorted(w for w in words if w.isalpha())


@lru_cache(maxsize=1)
def _t5_tokenizer_file() -> Path:
    """Train (once per process, ~10 s) a sentencepiece-style unigram model on CLIP's words; save its JSON."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=8000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", max_piece_length=16
    )
    tok.train_from_iterator(_clip_words(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    path = Path(tempfile.mkdtemp(prefix="attncontrol-t5-tok-")) / "tokenizer.json"
    tok.save(str(path))
    return path


def make_t5_tokenizer(max_length: int = 256):
    """A T5-style tokenizer built offline: 8000 unigram pieces learnt from CLIP's words, ``\u2581`` marking a word's
    start, no start token, ``</s>`` (id 1) at the end and ``<pad>`` (id 0) padding, as T5's own. No package ships
    T5's ``spiece.model``; this one tokenises like it (``\u2581cat``, ``\u2581rest`` + ``ing``)."""
    # transformers 4 defines T5TokenizerFast; 5 resolves the name at run time (to T5Tokenizer, itself fast now)
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    return T5TokenizerFast(
        tokenizer_file=str(_t5_tokenizer_file()),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


# ---------------------------------------------------------------- byte-level BPE with a chat template (LLM encoders)

# A Qwen-style chat template (ChatML turns; with add_generation_prompt, the assistant's turn is opened, and with
# enable_thinking false an empty thinking block follows, as Qwen3's own template writes it). Written for these tiny
# tokenizers: it renders the user/system turns the image pipelines send, nothing more.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}{{ part['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# A Mistral-style template: BOS, the system prompt in its markers, each user turn in [INST] ... [/INST]; message
# contents are lists of {"type": "text", "text": ...} parts, as a VLM processor takes them.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
_BYTE_SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "mistral": ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
}


@lru_cache(maxsize=2)
def _byte_bpe_file(style: str) -> Path:
    """Train (once per process, a few seconds) a byte-level BPE on CLIP's words, each seen with and without its
    leading space, as GPT-2-style vocabularies hold them (``cat`` and ``Ġcat``); save its JSON."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=6000,
        special_tokens=_BYTE_SPECIALS[style],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _clip_words()
    tok.train_from_iterator((f"{w} {w}" if i % 2 else f"a {w}\n{w}" for i, w in enumerate(words)), trainer=trainer)
    path = Path(tempfile.mkdtemp(prefix=f"attncontrol-{style}-tok-")) / "tokenizer.json"
    tok.save(str(path))
    return path


def make_chatml_tokenizer(max_length: int = 512):
    """A Qwen-style tokenizer built offline (the Qwen2.5-VL and Qwen3 encoders' kind): byte-level BPE learnt on
    CLIP's words (``Ġ`` marks a word after a space), no BOS or EOS added, ``<|endoftext|>`` padding, ChatML special
    tokens and a chat template with Qwen3's ``enable_thinking`` switch."""
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    return Qwen2TokenizerFast(
        tokenizer_file=str(_byte_bpe_file("chatml")),
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token=None,
        bos_token=None,
        model_max_length=max_length,
        chat_template=CHATML_TEMPLATE,
        padding_side="right",
    )


def make_mistral_tokenizer(max_length: int = 512):
    """A Mistral-style tokenizer built offline (the Mistral-3 encoder's kind): byte-level BPE learnt on CLIP's words,
    ``<s>`` written by the chat template (``[SYSTEM_PROMPT]``, ``[INST]`` markers), ``<pad>`` padding."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(_byte_bpe_file("mistral")),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
        chat_template=MISTRAL_TEMPLATE,
        padding_side="right",
    )
