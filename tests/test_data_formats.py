"""Format detection and conversion of raw rows into PreferencePair, and the errors for bad rows."""

from __future__ import annotations

import json

import pytest

from dpolab.data.formats import split_implicit_prompt, to_pairs
from dpolab.data.load import load_pairs
from dpolab.data.records import PreferencePair
from dpolab.errors import DataError

SRC = "prefs.jsonl"


def rows(*dicts: dict) -> list[tuple[int, dict]]:
    return list(enumerate(dicts, 1))


def fails(*dicts: dict) -> str:
    """Convert rows that must fail; return the (single-line) message."""
    with pytest.raises(DataError) as err:
        to_pairs(rows(*dicts), SRC)
    msg = str(err.value)
    assert "\n" not in msg and SRC in msg, msg
    return msg


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


GOOD = {"prompt": "Q", "chosen": "a", "rejected": "b"}

# ---------------------------------------------------------------------------------------------
# standard


def test_standard_is_verbatim_and_ignores_extra_keys():
    data = to_pairs(rows({"prompt": "  Q \n", "chosen": " a\t", "rejected": "", "score": 0.5, "id": "x"}),
                    SRC)
    assert data.format == "standard"
    assert data.pairs == [PreferencePair("  Q \n", " a\t", "", source=SRC, row=1)]
    assert data.rows_read == 1 and data.dropped == {} and data.source == SRC
    assert not data.pairs[0].conversational


def test_identical_pairs_are_dropped_and_counted():
    data = to_pairs(rows(GOOD, {"prompt": "Q", "chosen": "same", "rejected": "same"}, GOOD,
                         {"prompt": "R", "chosen": "", "rejected": ""}), SRC)
    assert [p.row for p in data.pairs] == [1, 3]
    assert data.rows_read == 4
    assert data.dropped == {"identical": 2}


def test_all_rows_dropped_is_an_error():
    msg = fails({"prompt": "Q", "chosen": "x", "rejected": "x"}, {"prompt": "R", "chosen": "", "rejected": ""})
    assert "all 2 rows were dropped" in msg and "chosen equals rejected" in msg


def test_no_rows_is_an_error():
    assert "no rows" in fails()


@pytest.mark.parametrize("value,found", [
    (5, "number 5"), (2.5, "number 2.5"), (True, "bool true"), (None, "null"),
    ({"text": "hi"}, "an object with keys ['text']"), (["a", "b"], "a list of 2 items"),
])
def test_wrong_type_for_text(value, found):
    msg = fails(GOOD, {"prompt": "Q", "chosen": value, "rejected": "b"})
    assert f"row 2, field 'chosen': expected text (a string), found {found}" in msg


def test_wrong_type_for_deciding_field():
    msg = fails({"prompt": 5, "chosen": "a", "rejected": "b"})
    assert "row 1, field 'prompt'" in msg and "found number 5" in msg
    msg = fails({"chosen": None, "rejected": "b"})
    assert "row 1, field 'chosen'" in msg and "found null" in msg


def test_missing_keys_lists_found_and_expected():
    msg = fails({"question": "Q", "answer": "a", "rejected": "b"})
    assert "row 1" in msg and "missing key 'chosen'" in msg
    assert "found keys ['question', 'answer', 'rejected']" in msg
    assert "chosen, rejected" in msg


def test_later_row_missing_prompt():
    msg = fails(GOOD, GOOD, {"chosen": "a", "rejected": "b"})
    assert "row 3" in msg and "missing key 'prompt'" in msg
    assert "found keys ['chosen', 'rejected']" in msg and "expected prompt, chosen, rejected" in msg


def test_row_in_another_format_names_both_rows():
    conv = {"prompt": [user("hi")], "chosen": [bot("a")], "rejected": [bot("b")]}
    msg = fails(*([GOOD] * 16), conv)
    assert "row 17 is conversational but row 1 is standard" in msg


# ---------------------------------------------------------------------------------------------
# implicit prompt (whole transcripts)


def test_split_implicit_prompt_by_hand():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Pens?\n\nAssistant: Sure, here."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Pens?\n\nAssistant: No."
    assert split_implicit_prompt(chosen, rejected) == (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Pens?\n\nAssistant:", " Sure, here.", " No.")


def test_split_uses_last_marker_inside_the_shared_prefix():
    # The answers share " Sure" and differ later; the marker before them still ends the prompt.
    assert split_implicit_prompt("H: x Assistant: Sure thing", "H: x Assistant: Sure, no") == (
        "H: x Assistant:", " Sure thing", " Sure, no")
    # One answer continues the conversation: the prompt stops at the last marker the two share.
    assert split_implicit_prompt("Human: a Assistant: b", "Human: a Assistant: b Human: c Assistant: d") == (
        "Human: a Assistant:", " b", " b Human: c Assistant: d")
    assert split_implicit_prompt("Human: a", "Human: b") is None


def test_implicit_prompt_rows():
    data = to_pairs(rows({"chosen": "Human: q Assistant: yes", "rejected": "Human: q Assistant: no", "id": 3},
                         {"chosen": "Human: r Assistant: ", "rejected": "Human: r Assistant: ok"},
                         {"chosen": "Human: s Assistant: same", "rejected": "Human: s Assistant: same"}), SRC)
    assert data.format == "implicit_prompt"
    assert [(p.prompt, p.chosen, p.rejected) for p in data.pairs] == [
        ("Human: q Assistant:", " yes", " no"), ("Human: r Assistant:", " ", " ok")]
    assert data.dropped == {"identical": 1}


def test_implicit_prompt_without_marker_asks_for_prompt_column():
    msg = fails({"chosen": "Human: q Assistant: a", "rejected": "Human: q Assistant: b"},
                {"chosen": "The answer is 4", "rejected": "The answer is 5"})
    assert "row 2" in msg and "'Assistant:'" in msg and "explicit 'prompt' column" in msg


def test_implicit_row_with_prompt_is_a_mismatch():
    msg = fails({"chosen": "Assistant: a", "rejected": "Assistant: b"}, GOOD)
    assert "row 2 is standard but row 1 is implicit_prompt" in msg


def test_hh_file_loads_as_is(hh_path):
    data = load_pairs(hh_path)
    assert data.format == "implicit_prompt"
    assert data.rows_read == 2312
    assert len(data.pairs) + sum(data.dropped.values()) == 2312
    # Checked by hand: no row of this file has identical answers after the split.
    assert data.dropped == {}
    assert all(p.prompt.endswith("Assistant:") for p in data.pairs)
    first = data.pairs[0]
    assert first.row == 1 and first.source == str(hh_path)
    assert first.prompt.startswith("\n\nHuman: ")
    assert first.prompt.endswith(
        "\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert first.chosen == (" No, sorry!  All of these involve a pen, the point is that you can get "
                            "funny results by doing pranks with pens.")
    assert first.rejected.startswith(" There are lots of funny things you can do with pens, here’s one "
                                     "example: use the pen as a zipper.")
    # Line 87 has an empty (whitespace-only) chosen answer: kept, since stopping is a valid preference.
    row87 = next(p for p in data.pairs if p.row == 87)
    assert row87.chosen == " " and row87.rejected.startswith(" Sure, the address is")


# ---------------------------------------------------------------------------------------------
# conversational


def test_conversational_explicit_prompt_and_single_message_completion():
    system = {"role": "system", "content": "Be brief."}
    data = to_pairs(rows({"prompt": [system, user("hi")], "chosen": bot("hello"), "rejected": [bot("go")],
                          "meta": {"x": 1}}), SRC)
    assert data.format == "conversational"
    pair = data.pairs[0]
    assert pair.conversational
    assert pair.prompt == [system, user("hi")]
    assert pair.chosen == [bot("hello")] and pair.rejected == [bot("go")]


def test_conversational_keeps_extra_message_keys_and_drops_null_ones():
    tool = {"role": "tool", "content": "42", "name": "calc", "tool_call_id": None}
    data = to_pairs(rows({"prompt": [user("sum?"), tool], "chosen": [bot("42")], "rejected": [bot("41")]}), SRC)
    assert data.pairs[0].prompt == [user("sum?"), {"role": "tool", "content": "42", "name": "calc"}]


def test_conversational_identical_dropped():
    data = to_pairs(rows({"prompt": [user("a")], "chosen": [bot("x")], "rejected": [bot("y")]},
                         {"prompt": [user("b")], "chosen": bot("z"), "rejected": [bot("z")]}), SRC)
    assert data.dropped == {"identical": 1} and len(data.pairs) == 1


@pytest.mark.parametrize("prompt,field,problem", [
    ([user("a"), bot("b"), {"role": "narrator", "content": "c"}], "prompt[2].role", "unknown role 'narrator'"),
    ([user("a"), bot("b"), {"role": 3, "content": "c"}], "prompt[2].role", "found number 3"),
    ([user("a"), {"role": "user", "content": None}], "prompt[1].content", "found null"),
    ([user("a"), {"role": "user"}], "prompt[1]", "message has no 'content'"),
    ([user("a"), "hello"], "prompt[1]", "expected a chat message"),
    ([], "prompt", "empty list"),
    ({"role": "user", "content": "a"}, "prompt", "expected a list of chat messages"),
])
def test_conversational_prompt_validation(prompt, field, problem):
    msg = fails({"prompt": [user("ok")], "chosen": [bot("a")], "rejected": [bot("b")]},
                {"prompt": prompt, "chosen": [bot("a")], "rejected": [bot("b")]})
    assert f"row 2, field '{field}'" in msg and problem in msg


def test_conversational_completion_must_be_assistant():
    msg = fails({"prompt": [user("a")], "chosen": [bot("x")], "rejected": [bot("y"), user("z")]})
    assert "row 1, field 'rejected[1].role'" in msg and "assistant" in msg and "'user'" in msg
    msg = fails({"prompt": [user("a")], "chosen": user("x"), "rejected": [bot("y")]})
    assert "field 'chosen[0].role'" in msg


def test_conversational_completion_wrong_type():
    msg = fails({"prompt": [user("a")], "chosen": "plain text", "rejected": [bot("y")]})
    assert "row 1, field 'chosen'" in msg and "expected a list of chat messages, found text" in msg


# ---------------------------------------------------------------------------------------------
# conversational, implicit prompt


def test_conversational_implicit_prompt():
    history = [{"role": "system", "content": "S"}, user("a"), bot("b"), user("c")]
    data = to_pairs(rows({"chosen": history + [bot("good")], "rejected": history + [bot("bad")]}), SRC)
    assert data.format == "conversational_implicit_prompt"
    pair = data.pairs[0]
    assert pair.prompt == history
    assert pair.chosen == [bot("good")] and pair.rejected == [bot("bad")]


def test_conversational_implicit_last_message_must_be_assistant():
    msg = fails({"chosen": [user("a"), bot("b")], "rejected": [user("a"), bot("c"), user("d")]})
    assert "row 1, field 'rejected[2].role'" in msg and "'user'" in msg


def test_conversational_implicit_prompts_must_match():
    msg = fails({"chosen": [user("a"), bot("b"), user("c"), bot("x")],
                 "rejected": [user("a"), bot("B"), user("c"), bot("y")]})
    assert "row 1, field 'rejected[1]'" in msg and "differ at message 1" in msg and "'prompt' column" in msg


def test_conversational_implicit_needs_a_prompt():
    msg = fails({"chosen": [bot("x")], "rejected": [bot("y")]})
    assert "row 1, field 'chosen'" in msg and "no prompt messages" in msg


def test_conversational_implicit_mismatch_with_standard_row():
    chat = {"chosen": [user("a"), bot("b")], "rejected": [user("a"), bot("c")]}
    msg = fails(chat, {"chosen": "Assistant: b", "rejected": "Assistant: c"})
    assert "row 2 is implicit_prompt but row 1 is conversational_implicit_prompt" in msg


# ---------------------------------------------------------------------------------------------
# Through a file: row numbers in messages are the file's line numbers


def test_errors_from_a_file_name_the_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"prompt": [user("hi")], "chosen": [bot("a")], "rejected": [bot("b")]}
    bad = {"prompt": [user("hi"), bot("yo"), {"role": "robot", "content": "x"}], "chosen": [bot("a")],
           "rejected": [bot("b")]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    msg = str(err.value)
    assert "chat.jsonl, row 3, field 'prompt[2].role'" in msg and "\n" not in msg
