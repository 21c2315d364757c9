"""Prompt-ensemble heads against hand computations, the head cache, and ad hoc classification."""

import math

import pytest
import torch
from PIL import Image
from torch import nn

from vlpretrain.errors import ConfigError
from zeroshot.classifier import DEFAULT_TEMPLATES, build_classifier, classify, default_tokenizer, fill

# 2-d text embeddings of every prompt the fake model knows
TEXT = {"a cat.": [3.0, 4.0], "the cat!": [1.0, 0.0], "a dog.": [0.0, 2.0], "the dog!": [2.0, 0.0],
        "a kitty.": [0.0, 1.0], "the kitty!": [0.0, 1.0]}
PROMPTS = list(TEXT)


class FakeTokenizer:
    def __call__(self, texts):
        return torch.tensor([[PROMPTS.index(t)] for t in texts])


class FakeClip(nn.Module):
    """encode_text looks prompts up in TEXT; encode_image returns the image tensor's first two pixel values."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.tensor([TEXT[p] for p in PROMPTS]), requires_grad=False)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))  # shape [1], as our models store it

    def encode_text(self, tokens):
        assert not self.training and not torch.is_grad_enabled()
        return self.table[tokens[:, 0]] * 1.0

    def encode_image(self, images):
        return images.flatten(1)[:, :2]


def test_head_matches_hand_computation():
    model = FakeClip().train()
    head = build_classifier(model, FakeTokenizer(), ["cat", "dog"], ["a {c}.", "the {c}!"], batch_size=3)
    # cat: normalised (3, 4) and (1, 0) average to (0.8, 0.4), norm sqrt(0.8)
    # dog: normalised (0, 2) and (2, 0) average to (0.5, 0.5), norm sqrt(0.5)
    assert head.shape == (2, 2) and head.dtype == torch.float32
    assert torch.allclose(head[:, 0], torch.tensor([0.8, 0.4]) / math.sqrt(0.8), atol=1e-6)
    assert torch.allclose(head[:, 1], torch.tensor([0.5, 0.5]) / math.sqrt(0.5), atol=1e-6)
    assert model.training  # mode restored for a trainer calling mid-run


def test_head_with_synonyms_and_callable_templates():
    head = build_classifier(FakeClip(), FakeTokenizer(), [["cat", "kitty"], "dog"],
                            [lambda c: f"a {c}.", "the {c}!"])
    # cat synonyms: (0.6,0.8), (1,0), (0,1), (0,1) -> mean (0.4, 0.7) -> normalised
    expected = torch.tensor([0.4, 0.7]) / math.hypot(0.4, 0.7)
    assert torch.allclose(head[:, 0], expected, atol=1e-6)


def test_fill_placeholders():
    assert fill("a photo of a {c}.", "dog") == "a photo of a dog."
    assert fill("itap of a {}.", "dog") == "itap of a dog."
    assert fill('a photo of the number: "{c}".', "7") == 'a photo of the number: "7".'
    with pytest.raises(ConfigError, match="has no {c} placeholder"):
        fill("a photo", "dog")


def test_head_cache_reused_and_keyed_by_weights(tmp_path):
    model = FakeClip()
    model.logit_scale = nn.Parameter(torch.tensor(2.3))  # open_clip's own 0-dim temperature hashes too
    first = build_classifier(model, FakeTokenizer(), ["cat"], ["a {c}."], cache_dir=tmp_path)
    files = list(tmp_path.glob("head-*.pt"))
    assert len(files) == 1
    with torch.no_grad():
        model.table[0] = torch.tensor([0.0, 5.0])  # new weights: a new key, a new head
    second = build_classifier(model, FakeTokenizer(), ["cat"], ["a {c}."], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("head-*.pt"))) == 2
    assert torch.allclose(first[:, 0], torch.tensor([0.6, 0.8])) and torch.allclose(second[:, 0], torch.tensor([0.0, 1.0]))
    # a cached head is read back rather than recomputed
    torch.save({"head": torch.full((2, 1), 7.0)}, files[0])
    with torch.no_grad():
        model.table[0] = torch.tensor([3.0, 4.0])
    assert build_classifier(model, FakeTokenizer(), ["cat"], ["a {c}."], cache_dir=tmp_path)[0, 0] == 7.0


def test_classify_probabilities_from_tensors():
    model = FakeClip()
    images = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])  # (2, 1, 1, 2): features (1, 0) and (0, 1)
    probs = classify(model, images, ["cat", "kitty"], ["a {c}."], tokenizer=FakeTokenizer())
    # heads: cat (0.6, 0.8), kitty (0, 1); logits = 10 * cosine
    logits = 10 * torch.tensor([[0.6, 0.0], [0.8, 1.0]])
    assert torch.allclose(probs, logits.softmax(dim=1), atol=1e-6)


def test_classify_pil_images_with_tiny_vit():
    from vlpretrain.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny-vit")
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 20), "blue")]
    probs = classify(model, images, ["red square", "blue square", "green square"])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-5)
    assert len(DEFAULT_TEMPLATES) == 7
    assert default_tokenizer(model).context_length == 24  # tiny-vit's text context, not open_clip's 77
