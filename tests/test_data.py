"""Loading, splitting, tokenizing and batching chat data: real Capybara rows, real tokenizers, no hub."""

import copy
import json
import logging
import random
import re

import datasets
import pytest
import torch

from capyft.batching import ChatCollator, StepBatchSampler, TaggedDataset
from capyft.chat import IGNORE_INDEX, encode_conversation
from capyft.data import (
    SAMPLE_DATA,
    cut,
    load_source,
    split_source,
    split_stats,
    to_messages,
    tokenize_split,
    trained_token_counts,
)

LDJNR_DATA = SAMPLE_DATA.with_name("capybara_sample_ldjnr.jsonl")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def numbered(n, **columns):
    """A DatasetDict of ``n`` rows with a ``text`` column holding their index, plus other splits as lists."""
    splits = {"train": [{"text": str(i)} for i in range(n)]}
    splits.update({name: [{"text": f"{name}{i}"} for i in range(size)] for name, size in columns.items()})
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


# ---- load_source


def test_load_source_reads_files_and_saved_datasets(tmp_path):
    loaded = load_source(SAMPLE_DATA)
    assert list(loaded) == ["train"] and len(loaded["train"]) == 16
    assert loaded["train"][0]["messages"][0]["role"] == "user"

    both = numbered(5, test=3)
    both.save_to_disk(tmp_path / "dict")
    assert {name: len(split) for name, split in load_source(tmp_path / "dict").items()} == {"train": 5, "test": 3}
    both["train"].save_to_disk(tmp_path / "one")
    assert {name: len(split) for name, split in load_source(str(tmp_path / "one")).items()} == {"train": 5}

    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="unsupported type; use .jsonl"):
        load_source(tmp_path / "rows.txt")


@pytest.mark.parametrize("source", ["./nope.jsonl", "nope.parquet", "/no/such/dir", "~/no-such-capyft-data"])
def test_load_source_missing_local_path(source):
    with pytest.raises(FileNotFoundError, match="does not exist; give an existing file or directory, or a hub id"):
        load_source(source)


def test_load_source_passes_hub_ids_to_datasets(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or "loaded")
    assert load_source("trl-lib/Capybara") == "loaded"
    assert calls == [(("trl-lib/Capybara",), {})]


# ---- schemas


def test_to_messages_reads_both_schemas(sample_rows):
    ldjnr = [json.loads(line) for line in LDJNR_DATA.read_text(encoding="utf-8").splitlines()]
    assert len(ldjnr) == len(sample_rows) == 16
    for trl_row, ldjnr_row in zip(sample_rows, ldjnr):
        assert to_messages(ldjnr_row) == to_messages(trl_row) == trl_row["messages"]
    # a table holding both columns has None in the one a row does not use
    assert to_messages({"messages": None, "conversation": [{"input": "a", "output": "b"}]}) == [
        user("a"),
        assistant("b"),
    ]
    with pytest.raises(ValueError, match="not an {input, output} mapping"):
        to_messages({"conversation": [{"input": "a"}]})
    with pytest.raises(ValueError, match="neither a 'messages' nor a 'conversation' column"):
        to_messages({"prompt": "a", "completion": "b"})


def test_schemas_give_identical_encodings(llama3_tokenizer):
    encoded = []
    for path in (SAMPLE_DATA, LDJNR_DATA):
        split = split_source(load_source(path), None, 0, 0)["train"]
        encoded.append(tokenize_split(split, llama3_tokenizer, "train", max_length=1024))
    trl, ldjnr = encoded
    assert len(trl) == 16
    for column in ("row", "input_ids", "labels", "messages"):
        assert trl[column] == ldjnr[column]


# ---- split_source


def rows_of(split):
    return split["row"]


def test_split_stored_order_sizes_and_disjoint():
    splits = split_source(numbered(20), train_size=10, val_size=4, test_size=3)
    assert rows_of(splits["train"]) == list(range(10))
    assert rows_of(splits["val"]) == [10, 11, 12, 13]
    assert rows_of(splits["test"]) == [14, 15, 16]
    assert splits["val"]["text"] == ["10", "11", "12", "13"]  # row is the source index
    # train_size None takes all that the other splits leave
    assert rows_of(split_source(numbered(20), None, 4, 3)["train"]) == list(range(13))


def test_split_shuffle_is_seeded():
    first = split_source(numbered(50), 20, 5, 5, shuffle=True, seed=7)
    again = split_source(numbered(50), 20, 5, 5, shuffle=True, seed=7)
    other = split_source(numbered(50), 20, 5, 5, shuffle=True, seed=8)
    ids = {name: rows_of(split) for name, split in first.items()}
    assert ids == {name: rows_of(split) for name, split in again.items()}
    assert ids != {name: rows_of(split) for name, split in other.items()}
    assert ids["train"] != list(range(20))
    assert [len(ids[name]) for name in ("train", "val", "test")] == [20, 5, 5]
    assert len(set(ids["train"]) | set(ids["val"]) | set(ids["test"])) == 30
    assert all(split["text"] == [str(r) for r in split["row"]] for split in first.values())


def test_split_uses_the_sources_test_split():
    splits = split_source(numbered(20, test=6), train_size=15, val_size=5, test_size=4)
    assert splits["test"]["text"] == ["test0", "test1", "test2", "test3"]
    assert rows_of(splits["train"]) == list(range(15)) and rows_of(splits["val"]) == list(range(15, 20))
    assert rows_of(split_source(numbered(20, test=6), None, 5, 4)["train"]) == list(range(15))
    with pytest.raises(ValueError, match="test_size 7 exceeds the 6 rows of the source's test split"):
        split_source(numbered(20, test=6), 10, 5, 7)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((15, 5, 1), r"train_size 15 \+ val_size 5 \+ test_size 1 = 21 rows, but the training split has only 20"),
        ((19, 2, 0), r"train_size 19 \+ val_size 2 \+ test_size 0 = 21 rows"),
        ((None, 25, 0), r"train_size 0 \+ val_size 25 \+ test_size 0 = 25 rows, but the training split has only 20"),
        ((-1, 2, 0), "train_size must be >= 0, got -1"),
        ((5, -2, 0), "val_size must be >= 0, got -2"),
    ],
)
def test_split_sizes_that_do_not_fit(sizes, message):
    with pytest.raises(ValueError, match=message):
        split_source(numbered(20), *sizes)


# ---- tokenize_split and bad rows

# Each bad row and the problem its error must name. Contents are str or None, so that arrow can hold them in one table
BAD_ROWS = {
    "missing messages": (None, "neither a 'messages' nor a 'conversation' column"),
    "empty messages": ([], "has no messages"),
    "unknown role": (
        [user("a"), {"role": "tool", "content": "b"}, assistant("c")],
        "message 1 has unknown role 'tool'",
    ),
    "non-string content": ([user("a"), {"role": "assistant", "content": None}], "content of type NoneType"),
    "empty content": ([user(""), assistant("b")], r"message 0 \(user\) has empty content"),
    "no assistant turn": ([user("a")], "no assistant turn"),
    "late system message": ([user("a"), {"role": "system", "content": "s"}, assistant("b")], "system message"),
    "template refuses it": ([user("a"), user("b"), assistant("c")], "cannot render this conversation: .*alternate"),
    "opens with the assistant": ([assistant("a"), user("b"), assistant("c")], "opens with an assistant message"),
    "trained tokens all cut": ([user("word " * 600), assistant("b")], "max_length=400 cuts every trained token"),
}
MAX_LENGTH = 400  # long enough for the first assistant turn of every sample row


@pytest.fixture(scope="module")
def strict_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with a template that, like many, refuses conversations whose roles do not alternate."""
    strict = copy.deepcopy(smollm2_tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% endfor %}"
        + smollm2_tokenizer.chat_template
    )
    return strict


def with_bad_rows(sample_rows, bad_at):
    """The 16 sample conversations with bad conversations inserted at the given positions (``{position: kind}``)."""
    good = iter(row["messages"] for row in sample_rows)
    n = len(sample_rows) + len(bad_at)
    rows = [{"messages": BAD_ROWS[bad_at[i]][0] if i in bad_at else next(good)} for i in range(n)]
    return split_source(datasets.DatasetDict(train=datasets.Dataset.from_list(rows)), None, 0, 0)["train"]


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_each_bad_row_gives_its_error(kind, sample_rows, strict_tokenizer):
    split = with_bad_rows(sample_rows[:4], {2: kind})
    problem = BAD_ROWS[kind][1]
    with pytest.raises(ValueError, match=f"1 bad row\\(s\\) in the train split. row 2: .*{problem}.*on_bad_row: skip"):
        tokenize_split(split, strict_tokenizer, "train", MAX_LENGTH)


def test_skip_drops_exactly_the_bad_rows(sample_rows, strict_tokenizer, caplog):
    bad_at = {0: "missing messages", 3: "empty messages", 5: "unknown role", 8: "non-string content"}
    bad_at |= {10: "empty content", 11: "no assistant turn", 15: "late system message", 19: "template refuses it"}
    bad_at |= {21: "opens with the assistant", 25: "trained tokens all cut"}
    split = with_bad_rows(sample_rows, bad_at)
    bad_rows = []
    with caplog.at_level(logging.WARNING, logger="capyft.data"):
        kept = tokenize_split(split, strict_tokenizer, "train", MAX_LENGTH, on_bad_row="skip", bad_rows=bad_rows)
    assert kept["row"] == [i for i in range(26) if i not in bad_at]
    assert [row for row, _ in bad_rows] == sorted(bad_at)  # every bad row, for the data preview to list
    assert all(re.search(BAD_ROWS[bad_at[row]][1], error) for row, error in bad_rows)
    assert kept["messages"] == [row["messages"] for row in sample_rows]
    assert "skipped 10 bad row(s) of 26 in the train split" in caplog.text
    assert set(kept.column_names) == {"row", "input_ids", "labels", "messages", "full_length", "lost_trained"}
    reference = encode_conversation(sample_rows[5]["messages"], strict_tokenizer, MAX_LENGTH)
    assert kept[5]["input_ids"] == reference["input_ids"] and kept[5]["labels"] == reference["labels"]


def test_no_usable_row_and_bad_option(sample_rows, strict_tokenizer):
    split = with_bad_rows([], {0: "empty messages", 1: "no assistant turn"})
    with pytest.raises(ValueError, match="the val split has no usable row left"):
        tokenize_split(split, strict_tokenizer, "val", MAX_LENGTH, on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row must be 'error' or 'skip', got 'drop'"):
        tokenize_split(split, strict_tokenizer, "val", MAX_LENGTH, on_bad_row="drop")


def test_file_without_chat_columns(tmp_path, smollm2_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(3)))
    split = split_source(load_source(path), None, 0, 0)["train"]
    with pytest.raises(ValueError, match=r"3 bad row\(s\) .* row 0: row has neither a 'messages' nor a 'conversation'"):
        tokenize_split(split, smollm2_tokenizer, "train", None)


def test_trained_token_counts_skip_the_first_position():
    assert trained_token_counts([[5, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 1], [IGNORE_INDEX]]) == [2, 1, 0]


# ---- ChatCollator


def example(ids, labels, **extra):
    return {"input_ids": ids, "labels": labels, **extra}


def test_padded_batch_masks_padding_and_keeps_end_of_turn_labels():
    eot = pad = 2  # as in SmolLM2: the pad id is the end-of-turn id
    examples = [
        example([9, 5, 6, eot, 7], [IGNORE_INDEX, 5, 6, eot, IGNORE_INDEX]),
        example([9, 4, eot], [-100, 4, eot]),
    ]
    batch = ChatCollator(pad_id=pad)(examples)
    assert batch["input_ids"].tolist() == [[9, 5, 6, eot, 7], [9, 4, eot, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6, eot, -100], [-100, 4, eot, -100, -100]]
    assert int((batch["labels"] == eot).sum()) == 2
    assert "position_ids" not in batch and "step_tokens" not in batch

    rounded = ChatCollator(pad_id=pad, pad_to_multiple_of=8)(
        [example(e["input_ids"], e["labels"], step_tokens=5) for e in examples]
    )
    assert rounded["input_ids"].shape == (2, 8)
    assert (rounded["labels"][rounded["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert rounded["step_tokens"].item() == 5


def test_padding_free_batch_restarts_positions():
    examples = [
        example([9, 5, 6], [5, 5, 6], step_tokens=7),
        example([9, 4], [9, 4]),
        example([9, 3, 3, 3], [9, 3, 3, 3]),
    ]
    batch = ChatCollator(pad_id=0, padding_free=True)(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids", "step_tokens"}
    assert batch["input_ids"].tolist() == [[9, 5, 6, 9, 4, 9, 3, 3, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # the first token of each conversation is not predicted from the conversation before it
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 4, -100, 3, 3, 3]]
    assert batch["step_tokens"].item() == 7


# ---- StepBatchSampler

N = 18
_rng = random.Random(0)
LENGTHS = [_rng.randint(10, 500) for _ in range(N)]
TRAINED = [_rng.randint(1, 300) for _ in range(N)]


def sampler(**kwargs):
    args = {"lengths": LENGTHS[: kwargs.pop("n", N)], "batch_size": 4, "accumulate": 1, "seed": 3} | kwargs
    args["trained"] = TRAINED[: len(args["lengths"])]
    return StepBatchSampler(**args)


def steps(batches, accumulate):
    """Groups micro-batches into optimizer steps: [(sorted indices, step_tokens)]."""
    groups = [batches[i : i + accumulate] for i in range(0, len(batches), accumulate)]
    out = []
    for group in groups:
        tokens = {t for batch in group for _, t in batch}
        assert len(tokens) == 1, "micro-batches of one step disagree on step_tokens"
        out.append((sorted(i for batch in group for i, _ in batch), tokens.pop()))
    return out


@pytest.mark.parametrize("group_by_length", [False, True])
def test_batch_size_and_accumulation_give_the_same_steps(group_by_length):
    wide = sampler(n=16, batch_size=4, accumulate=1, group_by_length=group_by_length)
    deep = sampler(n=16, batch_size=1, accumulate=4, group_by_length=group_by_length)
    wide_steps, deep_steps = steps(list(wide), 1), steps(list(deep), 4)
    assert wide_steps == deep_steps and len(wide_steps) == 4
    for indices, tokens in wide_steps:
        assert tokens == sum(TRAINED[i] for i in indices)
    assert sorted(i for indices, _ in wide_steps for i in indices) == list(range(16))
    assert len(wide) == 4 and len(deep) == 16 == len(list(deep))


def test_last_partial_step_counts_its_own_tokens():
    batches = list(sampler(batch_size=1, accumulate=4))  # 18 = 4 steps of 4 and one of 2
    assert len(batches) == 18
    *_, (last, tokens) = steps(batches, 4)
    assert len(last) == 2 and tokens == sum(TRAINED[i] for i in last)


def test_ranks_get_disjoint_equal_shares():
    ranks = [list(sampler(batch_size=2, num_replicas=2, rank=rank)) for rank in (0, 1)]
    indices = [[i for batch in batches for i, _ in batch] for batches in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(sampler(batch_size=2, num_replicas=2)) == 4
    assert not set(indices[0]) & set(indices[1])
    assert len(indices[0]) + len(indices[1]) == 16  # 18 rows: the 2 that cannot fill a batch on both ranks are dropped
    # a step spans both ranks: both see its total, which equals the single-device step of batch 4
    both = [(sorted(i for i, _ in a + b), a[0][1]) for a, b in zip(*ranks)]
    assert [b[0][1] for b in ranks[1]] == [t for _, t in both]
    assert both == steps(list(sampler(batch_size=4)), 1)


def test_skip_resumes_mid_epoch():
    full = list(sampler(batch_size=2))
    resumed = sampler(batch_size=2)
    resumed.set_epoch(0)
    resumed.skip = 3
    assert list(resumed) == full[3:]
    assert list(resumed) == full  # skip applies once
    resumed.skip = 3
    resumed.set_epoch(1)  # a new epoch starts from its beginning
    assert len(list(resumed)) == len(full)


def test_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch, **kwargs):
        s = sampler(seed=seed, **kwargs)
        s.set_epoch(epoch)
        return [i for batch in s for i, _ in batch]

    assert order(3, 1) == order(3, 1)
    assert order(3, 0) != order(3, 1)
    assert order(3, 1) != order(4, 1)
    assert order(3, 1, shuffle=False) == order(4, 2, shuffle=False) == list(range(16))
    s = sampler()
    assert [list(s) for _ in range(2)] == [list(sampler())] * 2  # iterating again does not advance an RNG


def test_group_by_length_batches_similar_lengths():
    s = sampler(n=16, batch_size=2, group_by_length=True)
    lengths = [LENGTHS[i] for batch in s for i, _ in batch]
    assert lengths == sorted(lengths, reverse=True)  # one window of 50 x 2 holds all 16 rows


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size and accumulate must be >= 1"):
        sampler(batch_size=0)


def test_tagged_dataset_attaches_step_tokens():
    split = datasets.Dataset.from_list([{"input_ids": [1, 2], "labels": [-100, 2], "row": 7, "messages": []}])
    data = TaggedDataset(split)
    assert len(data) == 1
    assert data[0] == {"input_ids": [1, 2], "labels": [-100, 2], "row": 7}
    assert data[(0, 11)] == {"input_ids": [1, 2], "labels": [-100, 2], "row": 7, "step_tokens": 11}
    batch = ChatCollator(pad_id=0)([data[(0, 11)]])
    assert isinstance(batch["step_tokens"], torch.Tensor) and batch["step_tokens"].item() == 11


def test_skip_survives_a_first_writer_batch_of_only_bad_rows(smollm2_tokenizer):
    # datasets writes 1,000 rows at a time; the column types must not come from a batch of bad rows alone
    rows = [{"messages": [user("a")]}] * 1000 + [{"messages": [user("Hi"), assistant("Hello")]}] * 2
    split = split_source(datasets.DatasetDict(train=datasets.Dataset.from_list(rows)), None, 0, 0)["train"]
    kept = tokenize_split(split, smollm2_tokenizer, "train", None, on_bad_row="skip")
    assert kept["row"] == [1000, 1001]
    assert kept[0]["labels"][-3:] == [*smollm2_tokenizer.convert_tokens_to_ids(["Hello", "<|im_end|>"]), IGNORE_INDEX]


# ---- max_length cut and split statistics


def test_cut_counts_the_trained_tokens_it_removes():
    enc = {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 6]}
    assert cut(enc, 4) == ({"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4]}, 1)
    assert cut(enc, 5)[1] == 1 and cut(enc, 3)[1] == 2
    with pytest.raises(ValueError, match=r"max_length=2 cuts every trained token of this conversation \(2 tokens"):
        cut(enc, 2)
    with pytest.raises(ValueError, match="max_length must be positive, got 0"):
        cut(enc, 0)


def test_split_stats_on_a_tokenized_split(sample_rows, smollm2_tokenizer):
    rows = sample_rows[:5]
    split = split_source(datasets.DatasetDict(train=datasets.Dataset.from_list(rows)), None, 0, 0)["train"]
    stats = split_stats(tokenize_split(split, smollm2_tokenizer, "train", 800))
    full = [encode_conversation(row["messages"], smollm2_tokenizer) for row in rows]  # 1116, 707, 915, 811, 915
    lengths = sorted(min(len(e["input_ids"]), 800) for e in full)
    lost = [sum(label != IGNORE_INDEX for label in e["labels"][800:]) for e in full]
    trained = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:800]) for e in full)
    assert stats == {
        "conversations": 5,
        "min": 707,
        "median": 800,
        "p95": 800,
        "max": 800,
        "truncated": 4,
        "lost_rows": 4,
        "lost_tokens": sum(lost),
        "trained_tokens": trained,
        "tokens": sum(lengths),
        "trained_share": trained / sum(lengths),
    }
    assert lengths == [707, 800, 800, 800, 800] and sum(x > 0 for x in lost) == 4


def test_load_source_names_a_malformed_jsonl_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = SAMPLE_DATA.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"data.source: {path} line 4 is not valid JSON"):
        load_source(path)
