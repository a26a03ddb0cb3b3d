"""The models behind the benchmark scores, each from a local folder in transformers' layout.

- :class:`VqaScorer`: T2I-CompBench's BLIP-VQA attribute-binding score (``BLIPvqa_eval/BLIP_vqa.py`` and
  ``models/blip_vqa.py:vqa_prob``): one question per noun phrase (``"a green bench?"``), the answer decoder's
  first-token distribution from its start token, ``P(yes) / (P(yes) + P(no))`` per question, the product over the
  prompt's phrases (at most 8), each factor and the product rounded to 4 decimals as the benchmark prints them.
- :class:`Detector`: an open-vocabulary detector (OWL-ViT or OWLv2) giving each queried name its boxes and scores.
"""

from __future__ import annotations

import re

from ..errors import ModelLoadError
from .pretrained import load_pretrained

# T2I-CompBench skips these noun chunks (they are parts of spatial phrases, not objects)
SKIPPED_PHRASES = ("top", "the side", "the left", "the right")
MAX_PHRASES = 8  # T2I-CompBench's np_num
DETECTORS = ("owlv2", "owlvit")


def vqa_question(phrase: str, max_words: int = 50) -> str:
    """BLIP's question clean-up (``data/utils.py:pre_question``) of ``phrase + "?"``: lower case, the characters
    ``.!"()*#:;~`` removed, trailing spaces stripped, at most ``max_words`` words."""
    text = re.sub(r'[.!"()*#:;~]', "", f"{phrase}?".lower()).rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def binding_score(probabilities: list[float]) -> float:
    """The product of the per-phrase yes-probabilities, as T2I-CompBench forms it (4-decimal factors and product)."""
    score = 1.0
    for p in probabilities:
        score *= float(f"{p:.4f}")
    return float(f"{score:.4f}")


class VqaScorer:
    """BLIP VQA (``BlipForQuestionAnswering`` + ``BlipProcessor``), e.g. a local Salesforce/blip-vqa-capfilt-large,
    the model T2I-CompBench uses."""

    def __init__(self, path: str, device="cpu", allow_pickle: bool = False):
        import torch
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.device = torch.device(device)
        safe = None if allow_pickle else True
        self.model = load_pretrained(BlipForQuestionAnswering, path, "VQA model", flag="--vqa", use_safetensors=safe)
        self.model = self.model.to(self.device).eval()
        self.processor = load_pretrained(BlipProcessor, path, "VQA processor", flag="--vqa")
        tok = self.processor.tokenizer
        self.yes, self.no = tok.convert_tokens_to_ids(["yes", "no"])
        if tok.unk_token_id in (self.yes, self.no):
            raise ModelLoadError(f"the VQA model at {path!r} has no 'yes'/'no' tokens: is it a BLIP VQA model?")

    def yes_probabilities(self, image, questions: list[str]) -> list[float]:
        """``P(yes) / (P(yes) + P(no))`` of the answer's first token, for each question about ``image``. The image
        is encoded once; each question goes through alone (unpadded, as BLIP's own generate() sees it)."""
        import torch

        m = self.model
        if not questions:
            return []
        out = []
        with torch.no_grad():
            pixels = self.processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
            image_embeds = m.vision_model(pixel_values=pixels.to(self.device, m.dtype)).last_hidden_state
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            start = torch.full((1, 1), m.decoder_start_token_id, device=self.device)
            for q in questions:
                ids = self.processor.tokenizer(q, return_tensors="pt")["input_ids"].to(self.device)
                question = m.text_encoder(
                    input_ids=ids, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
                ).last_hidden_state
                logits = m.text_decoder(input_ids=start, encoder_hidden_states=question).logits
                probs = logits[0, -1].float().softmax(-1)
                out.append(float(probs[self.yes] / (probs[self.yes] + probs[self.no])))
        return out

    def score(self, image, phrases: list[str]) -> tuple[float, list[float]]:
        """The binding score of ``image`` for its prompt's noun phrases, and the per-phrase probabilities."""
        phrases = [p for p in phrases if p not in SKIPPED_PHRASES][:MAX_PHRASES]
        probs = self.yes_probabilities(image, [vqa_question(p) for p in phrases])
        return binding_score(probs), probs


class Detector:
    """An open-vocabulary detector from transformers (OWLv2, e.g. google/owlv2-base-patch16-ensemble, or OWL-ViT).
    Each name is queried as ``"a photo of a NAME"``; boxes come back in the image's pixels, clipped to it."""

    query = "a photo of a {}"

    def __init__(self, path: str, device="cpu", allow_pickle: bool = False):
        import torch
        from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

        self.device = torch.device(device)
        config = load_pretrained(AutoConfig, path, "detector config", flag="--detector")
        if config.model_type not in DETECTORS:
            raise ModelLoadError(
                f"the detector at {path!r} is a {config.model_type!r} model; --detector takes an OWLv2 or OWL-ViT "
                "folder (e.g. a downloaded google/owlv2-base-patch16-ensemble)"
            )
        safe = None if allow_pickle else True
        self.model = (
            load_pretrained(
                AutoModelForZeroShotObjectDetection, path, "detector", flag="--detector", use_safetensors=safe
            )
            .to(self.device)
            .eval()
        )
        self.processor = load_pretrained(AutoProcessor, path, "detector processor", flag="--detector")

    def detect(self, image, names: list[str], threshold: float) -> dict[str, list[tuple[float, list[float]]]]:
        """Every box scored above ``threshold`` for each name, best first, as ``(score, [x0, y0, x1, y1])``."""
        import torch

        names = list(dict.fromkeys(names))
        found: dict[str, list] = {n: [] for n in names}
        if not names:
            return found
        image = image.convert("RGB")
        w, h = image.size
        inputs = self.processor(text=[[self.query.format(n) for n in names]], images=[image], return_tensors="pt")
        with torch.no_grad():
            outputs = self.model(**inputs.to(self.device))
        result = self.processor.post_process_grounded_object_detection(
            outputs=outputs, threshold=threshold, target_sizes=[(h, w)]
        )[0]
        for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()):
            x0, y0, x1, y1 = box
            clipped = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
            found[names[label]].append((float(score), clipped))
        return {n: sorted(dets, key=lambda d: -d[0]) for n, dets in found.items()}
