"""Tokenizers trained on the shards' own captions with Hugging Face `tokenizers`, for a text tower from scratch.

The result is a folder that `transformers.AutoTokenizer.from_pretrained(DIR)` loads offline (tokenizer.json plus
its special tokens), so a model config's `text_cfg.hf_tokenizer_name: DIR` uses it. Special tokens follow XLM-R's
ids (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4), the defaults of a `transformers` XLM-R/RoBERTa config, and every
text is wrapped as `<s> text </s>`. No normaliser unless asked to lower-case: decoding gives back the text as
written, in any script.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from vlpretrain.errors import ConfigError

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
KINDS = ("unigram", "bpe")


def shard_captions(urls: Iterable[str], text_key: str = "txt") -> Iterator[str]:
    """The first caption of every sample of the shards, in shard order (image bytes are never read)."""
    from vlpretrain.data.stages import SampleKeys, peek_captions

    keys = SampleKeys.parse("jpg", text_key)
    for url in urls:
        yield from peek_captions([url], per_shard=2**62, keys=keys)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | Path, kind: str = "unigram",
                    lowercase: bool = False) -> Path:
    """Train a `kind` ("unigram" or "bpe") tokenizer of at most `vocab_size` tokens on `texts`; save it in `out`.
    With `lowercase`, text is lower-cased first (prompts then match captions whatever their case; decoding gives
    the lower-cased text)."""
    from vlpretrain.models.hf_text import require_transformers

    require_transformers("vlpretrain tokenizer train")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ConfigError(f"--type: expected one of {', '.join(KINDS)}, got {kind!r}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ConfigError(f"--vocab-size: must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    if kind == "unigram":
        # sentencepiece's way: a space becomes ▁, so scripts without spaces (Chinese, Japanese) need no splitter
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                          unk_token="<unk>", show_progress=False)
    else:
        # byte-level BPE: every string encodes, no <unk>
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if lowercase:
        from tokenizers import normalizers

        tok.normalizer = normalizers.Lowercase()
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for t in texts:
            count += 1
            yield t

    try:
        tok.train_from_iterator(counted(), trainer=trainer)
    except Exception as e:  # the Rust trainer raises a bare Exception for a vocabulary its texts cannot fill
        if "not large enough" not in str(e):
            raise
        raise ConfigError(f"--vocab-size: {vocab_size} tokens cannot hold every character of the captions ({e}); "
                          "give a larger one") from None
    if count == 0:
        raise ConfigError("tokenizer train: the shards hold no captions")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("<s>", "</s>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   clean_up_tokenization_spaces=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out
