"""Tests for dpolab.data.tokenize: exact boundaries, BOS/EOS, chat templates, truncation.

Expected ids are written out by hand (read off the tokenizer's vocabulary), never produced by the
code under test. Tokenizers: the real stories260K sentencepiece-style Llama tokenizer, and tiny
byte-level BPE tokenizers trained here with ``tokenizers``.
"""

from __future__ import annotations

import gzip
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dpolab.data.records import PreferencePair
from dpolab.data.tokenize import TokenizedPair, TokenizeStats, render_conversational, tokenize_pairs
from dpolab.errors import ConfigError

BOS, EOS = 1, 2  # stories260K
ONCE = [403, 407, 261, 378]  # "Once upon a time" -> ▁Once ▁upon ▁a ▁time
THERE_GIRL = [383, 286, 261, 298, 315, 421]  # " there was a girl": ▁there ▁was ▁a ▁g ir l
NAMED_LILY = [395, 317]  # " named Lily" after a prompt -> ▁named ▁Lily

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN_CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant:{% endif %}")


def _bpe(*, eos: str | None = "<|endoftext|>", bos: str | None = None, post=None,
         chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (GPT-2 style: no BOS); its merges include "ab", not "ac"."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["ab ab abab hello world, hello there"] * 20, trainer)
    if post is not None:
        tok.post_processor = post
    kwargs = {"eos_token": eos} if eos else {}
    if bos:
        kwargs["bos_token"] = bos
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def _ids(tokenizer, *tokens: str) -> list[int]:
    """Vocabulary ids of ``tokens`` (each must exist: a typo must not turn into ``None``)."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    assert None not in ids and tokenizer.unk_token_id not in ids, tokens
    return ids


def _one(pair: PreferencePair, tokenizer, max_length: int = 1000, max_prompt_length: int = 1000):
    pairs, stats = tokenize_pairs([pair], tokenizer, max_length=max_length,
                                  max_prompt_length=max_prompt_length)
    assert len(pairs) == 1, stats
    return pairs[0], stats


# --- stories260K (sentencepiece / Metaspace, BOS=1, EOS=2) -------------------------------------


def test_stories_exact_boundary(stories_tokenizer):
    tok = stories_tokenizer
    item, stats = _one(PreferencePair("Once upon a time", " there was a girl", " named Lily"), tok)
    assert item == TokenizedPair([BOS] + ONCE, THERE_GIRL + [EOS], NAMED_LILY + [EOS], 0)
    # No spurious "▁" (id 410) starts the completion, as it does when " there..." is encoded alone.
    assert tok(" there was a girl", add_special_tokens=False)["input_ids"][0] == 410
    assert stats == TokenizeStats(kept=1, dropped={}, prompt_truncated=0, completion_truncated=0,
                                  boundary_fallbacks=0)
    whole = item.prompt_ids + item.chosen_ids
    assert whole == tok("Once upon a time there was a girl")["input_ids"] + [EOS]
    assert whole.count(BOS) == 1 and whole.count(EOS) == 1 and whole[0] == BOS and whole[-1] == EOS
    assert tok.decode(whole, skip_special_tokens=True) == "Once upon a time there was a girl"
    assert tok.decode(item.prompt_ids, skip_special_tokens=True) == "Once upon a time"


def test_stories_bos_in_text_and_eos_in_completion_not_doubled(stories_tokenizer):
    item, _ = _one(PreferencePair("<s>Once upon a time", " there was a girl</s>", " named Lily"),
                   stories_tokenizer)
    assert item.prompt_ids == [BOS] + ONCE
    assert item.chosen_ids == THERE_GIRL + [EOS]
    assert item.rejected_ids == NAMED_LILY + [EOS]


def test_stories_eos_text_followed_by_whitespace_gets_no_second_eos(stories_tokenizer):
    item, _ = _one(PreferencePair("Once upon a time", " there was a girl</s>\n", " named Lily"),
                   stories_tokenizer)
    # sentencepiece prepends "▁" (410) to the text after a special token: "</s>\n" -> 2, 410, 13.
    assert item.chosen_ids == THERE_GIRL + [EOS, 410, 13]


def test_stories_chat_template_that_renders_bos(stories_dir):
    tok = AutoTokenizer.from_pretrained(stories_dir)  # a private copy: the template is set on it
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}{% endif %}")
    pair = PreferencePair([{"role": "user", "content": "Once upon a time"}],
                          [{"role": "assistant", "content": " there was a girl"}],
                          [{"role": "assistant", "content": " named Lily"}])
    assert render_conversational(pair, tok) == ("<s>Once upon a time", " there was a girl",
                                                " named Lily")
    item, _ = _one(pair, tok)
    assert item == TokenizedPair([BOS] + ONCE, THERE_GIRL + [EOS], NAMED_LILY + [EOS], 0)


# --- byte-level BPE without BOS ------------------------------------------------------------------


def test_bpe_no_bos_no_none_and_eos_appended():
    tok = _bpe()
    eos, he, llo, world, space_hello = _ids(tok, "<|endoftext|>", "he", "llo", "Ġworld", "Ġhello")
    assert tok.bos_token is None and eos == 0
    item, stats = _one(PreferencePair("hello", " world", " hello"), tok)
    assert item.prompt_ids == [he, llo]
    assert item.chosen_ids == [world, eos]
    assert item.rejected_ids == [space_hello, eos]
    assert None not in item.prompt_ids + item.chosen_ids + item.rejected_ids
    assert stats.boundary_fallbacks == 0


def test_bpe_merge_across_boundary_uses_fallback():
    tok = _bpe()
    a, b, c, ab = _ids(tok, "a", "b", "c", "ab")
    assert tok("ab", add_special_tokens=False)["input_ids"] == [ab]  # the merge crosses "a" | "b"
    item, stats = _one(PreferencePair("a", "b", "c"), tok)
    assert item.prompt_ids == [a]
    assert item.chosen_ids == [b, 0]  # encoded alone: joint "ab" is one token
    assert item.rejected_ids == [c, 0]  # "ac" has no merge: exact split
    assert stats.boundary_fallbacks == 1


def test_appended_special_suffix_is_not_left_in_the_prompt():
    post = processors.TemplateProcessing(single="<|im_start|> $A <|endoftext|>",
                                         special_tokens=[("<|im_start|>", 1), ("<|endoftext|>", 0)])
    tok = _bpe(bos="<|im_start|>", post=post)
    he, llo, world = _ids(tok, "he", "llo", "Ġworld")
    assert tok("hello")["input_ids"] == [1, he, llo, 0]  # the tokenizer appends EOS to every text
    item, _ = _one(PreferencePair("hello", " world", " hello"), tok)
    assert item.prompt_ids == [1, he, llo]
    assert item.chosen_ids == [world, 0]


# --- chat templates ------------------------------------------------------------------------------


def _chat_pair() -> PreferencePair:
    return PreferencePair([{"role": "user", "content": "hello"}],
                          [{"role": "assistant", "content": "hello world"}],
                          [{"role": "assistant", "content": "ab"}])


def test_chatml_turn_end_is_eos_and_not_doubled():
    tok = _bpe(eos="<|im_end|>", chat_template=CHATML)
    prompt, chosen, rejected = render_conversational(_chat_pair(), tok)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert (chosen, rejected) == ("hello world<|im_end|>\n", "ab<|im_end|>\n")
    item, stats = _one(_chat_pair(), tok)
    im_start, im_end = 1, 2
    gen_prompt = [im_start, *tok("assistant\n", add_special_tokens=False)["input_ids"]]
    assert item.prompt_ids[-len(gen_prompt):] == gen_prompt
    assert item.prompt_ids.count(im_start) == 2
    assert item.chosen_ids.count(im_end) == 1 and item.rejected_ids.count(im_end) == 1
    assert tok.decode(item.chosen_ids) == "hello world<|im_end|>\n"
    assert stats.boundary_fallbacks == 0


def test_template_without_turn_end_gets_eos_appended():
    tok = _bpe(chat_template=PLAIN_CHAT)
    assert render_conversational(_chat_pair(), tok) == ("user: hello\nassistant:", " hello world\n",
                                                        " ab\n")
    item, _ = _one(_chat_pair(), tok)
    assert item.chosen_ids[-1] == 0 and item.chosen_ids.count(0) == 1
    assert tok.decode(item.chosen_ids) == " hello world\n<|endoftext|>"


def test_template_that_rewrites_history_falls_back_to_content():
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: <think>{% endif %}")
    tok = _bpe(chat_template=template)
    assert render_conversational(_chat_pair(), tok) == ("user: hello\nassistant: <think>",
                                                        "hello world", "ab")


def test_mixed_standard_and_conversational_keep_their_index():
    tok = _bpe(chat_template=PLAIN_CHAT)
    pairs = [PreferencePair("hello", " world", " world"), _chat_pair(),
             PreferencePair("hello", " world", " hello")]
    items, stats = tokenize_pairs(pairs, tok, max_length=100, max_prompt_length=50)
    assert [item.index for item in items] == [1, 2]
    assert stats.kept == 2 and stats.dropped == {"identical_after_truncation": 1}


# --- truncation ----------------------------------------------------------------------------------


def test_truncation_keeps_bos_and_last_prompt_tokens(stories_tokenizer):
    pair = PreferencePair("Once upon a time there was a girl", " named Lily", " there was a girl")
    item, stats = _one(pair, stories_tokenizer, max_length=7, max_prompt_length=4)
    assert item.prompt_ids == [BOS, 298, 315, 421]  # BOS + "▁g ir l"
    assert item.chosen_ids == NAMED_LILY + [EOS]  # exactly fills max_length
    assert item.rejected_ids == THERE_GIRL[:3]  # cut from the end, EOS lost
    assert len(item.prompt_ids) + len(item.rejected_ids) == 7
    assert (stats.prompt_truncated, stats.completion_truncated) == (1, 1)


def test_prompt_length_one_keeps_only_bos(stories_tokenizer):
    item, _ = _one(PreferencePair("Once upon a time", " named Lily", " there was a girl"),
                   stories_tokenizer, max_length=3, max_prompt_length=1)
    assert item == TokenizedPair([BOS], NAMED_LILY, THERE_GIRL[:2], 0)


def test_truncation_without_bos_keeps_last_tokens():
    tok = _bpe()
    hello, world = _ids(tok, "Ġhello", "Ġworld")
    item, _ = _one(PreferencePair("hello hello world", " world", " hello"), tok,
                   max_length=4, max_prompt_length=2)
    assert item.prompt_ids == [hello, world]
    assert (item.chosen_ids, item.rejected_ids) == ([world, 0], [hello, 0])


def test_drops_are_counted(stories_tokenizer):
    pairs = [
        PreferencePair("Once upon a time", " there was a girl", " named Lily"),  # kept, cut
        PreferencePair("Once upon a time there was a girl", " named Lily", " there"),  # too long
        PreferencePair("Once upon a time", " there was a girl", " there was a boy"),  # identical
        PreferencePair("Once upon a time", " named Lily", " named Lily"),  # identical from start
    ]
    items, stats = tokenize_pairs(pairs, stories_tokenizer, max_length=8, max_prompt_length=8)
    assert items == [TokenizedPair([BOS] + ONCE, THERE_GIRL[:3], NAMED_LILY + [EOS], 0)]
    assert stats == TokenizeStats(kept=1, dropped={"prompt_too_long": 1,
                                                   "identical_after_truncation": 2},
                                  prompt_truncated=0, completion_truncated=1, boundary_fallbacks=0,
                                  first_dropped={"prompt_too_long": 1, "identical_after_truncation": 2})


# --- errors --------------------------------------------------------------------------------------


def test_tokenizer_without_eos_is_a_config_error():
    with pytest.raises(ConfigError, match="eos_token"):
        tokenize_pairs([PreferencePair("a", "b", "c")], _bpe(eos=None), max_length=8,
                       max_prompt_length=4)


def test_conversational_without_chat_template_is_a_config_error():
    with pytest.raises(ConfigError, match="chat_template") as err:
        tokenize_pairs([_chat_pair()], _bpe(), max_length=8, max_prompt_length=4)
    assert "set tokenizer.chat_template" in str(err.value)


@pytest.mark.parametrize("max_length, max_prompt_length, name",
                         [(1, 1, "max_length"), (8, 0, "max_prompt_length")])
def test_bad_lengths_are_config_errors(max_length, max_prompt_length, name):
    with pytest.raises(ConfigError, match=name):
        tokenize_pairs([], _bpe(), max_length=max_length, max_prompt_length=max_prompt_length)


# --- real data -----------------------------------------------------------------------------------


def _hh_pairs(path) -> list[PreferencePair]:
    """HH rows split at the last "Assistant:" (the implicit prompt), done by hand for this test."""
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            pairs.append(PreferencePair(row["chosen"][:cut], row["chosen"][cut:],
                                        row["rejected"][cut:]))
    return pairs


def test_hh_invariants(hh_path, stories_tokenizer):
    pairs = _hh_pairs(hh_path)
    items, stats = tokenize_pairs(pairs, stories_tokenizer, max_length=512, max_prompt_length=256)
    assert stats.kept + sum(stats.dropped.values()) == len(pairs) == 2312
    for item in items:
        assert item.prompt_ids[0] == BOS and item.prompt_ids.count(BOS) == 1
        assert len(item.prompt_ids) <= 256 and item.chosen_ids != item.rejected_ids
        for completion in (item.chosen_ids, item.rejected_ids):
            assert 0 < len(item.prompt_ids) + len(completion) <= 512
            assert completion[-1] == EOS or len(item.prompt_ids) + len(completion) == 512
    first = next(item for item in items if len(item.prompt_ids) < 256)
    text = stories_tokenizer.decode(first.prompt_ids + first.chosen_ids, skip_special_tokens=True)
    assert text == pairs[first.index].prompt + pairs[first.index].chosen


def test_empty_prompt_starts_from_bos_or_eos(stories_tokenizer):
    item, _ = _one(PreferencePair("", "Once", "upon"), stories_tokenizer)
    assert item.prompt_ids == [BOS] and item.chosen_ids[-1] == EOS
