"""ChatDataModule on the real Capybara sample with real tokenizers, no trainer attached."""

import pytest
import torch

from capyft import assets
from capyft.chat import IGNORE_INDEX, encode_conversation
from capyft.data import SAMPLE_DATA
from capyft.datamodule import ChatDataModule

# 16 rows in stored order: train rows 0-7, val 8-11, test 12-15


def make(tokenizer_dir, tokenizer=None, **kwargs):
    """A set-up data module; ``tokenizer`` (already loaded from ``tokenizer_dir``) saves loading it again."""
    args = {"source": str(SAMPLE_DATA), "train_size": 8, "val_size": 4, "test_size": 4, "max_length": None}
    data = ChatDataModule(tokenizer_name_or_path=str(tokenizer_dir), **(args | kwargs))
    data.tokenizer = tokenizer
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def smollm2_data():
    return make(assets.smollm2_dir(), batch_size=4, eval_batch_size=3)


def test_setup_splits_in_stored_order(smollm2_data):
    assert {name: split["row"] for name, split in smollm2_data.splits.items()} == {
        "train": list(range(8)),
        "val": [8, 9, 10, 11],
        "test": [12, 13, 14, 15],
    }


def test_train_batches_pad_safely_when_pad_is_end_of_turn(smollm2_data, sample_rows):
    tokenizer = smollm2_data.tokenizer
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert smollm2_data.pad_id == eot  # SmolLM2 pads with its end-of-turn token
    split = smollm2_data.splits["train"]
    by_ids = {tuple(ids): row for ids, row in zip(split["input_ids"], split["row"])}

    batches = list(smollm2_data.train_dataloader())
    assert len(batches) == 2
    seen = []
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "attention_mask", "step_tokens"}
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 4 and ids.dtype == torch.long
        assert mask.sum(1).max() == ids.shape[1]  # padded to the longest
        assert (labels[mask == 0] == IGNORE_INDEX).all() and (ids[mask == 0] == eot).all()
        # trained labels are the input tokens themselves (the model shifts them)
        trained = labels != IGNORE_INDEX
        assert (labels[trained] == ids[trained]).all()
        for i in range(4):
            n = int(mask[i].sum())
            assert mask[i, :n].all()  # right padding
            row = by_ids[tuple(ids[i, :n].tolist())]
            seen.append(row)
            turns = sum(m["role"] == "assistant" for m in sample_rows[row]["messages"])
            assert int((labels[i] == eot).sum()) == turns  # every end-of-turn label survives the padding
        assert batch["step_tokens"].item() == int(trained[:, 1:].sum())
    assert sorted(seen) == list(range(8))


def test_val_batches(smollm2_data):
    batches = list(smollm2_data.val_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    expected = smollm2_data.splits["val"]["input_ids"]
    got = [
        b["input_ids"][i, : int(b["attention_mask"][i].sum())].tolist()
        for b in batches
        for i in range(len(b["input_ids"]))
    ]
    assert got == expected  # stored order
    assert "step_tokens" not in batches[0]


def test_prompt_loader_left_pads_in_order(smollm2_data, sample_rows):
    tokenizer = smollm2_data.tokenizer
    smollm2_data.setup("test")
    batches = list(smollm2_data.test_dataloader())
    assert [len(b["row"]) for b in batches] == [3, 1]
    # longest prompts first (little left padding); the test hook restores the row order when it gathers answers
    assert sorted(row for b in batches for row in b["row"]) == [12, 13, 14, 15]
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True)
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape and mask[:, -1].all()
        for i, row in enumerate(batch["row"]):
            messages = sample_rows[row]["messages"]
            n = int(mask[i].sum())
            assert not mask[i, : ids.shape[1] - n].any() and (ids[i, : ids.shape[1] - n] == smollm2_data.pad_id).all()
            prompt = tokenizer.decode(
                ids[i, -n:].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            assert prompt.endswith(messages[-2]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
            assert batch["reference"][i] == messages[-1]["content"]
            assert batch["prompt"][i] == messages[:-1]


def test_padding_free_batches(llama3_tokenizer):
    data = make(assets.llama3_tokenizer_dir(), llama3_tokenizer, batch_size=2, padding_free=True, max_length=300)
    split = data.splits["train"]
    lengths = {tuple(ids): len(ids) for ids in split["input_ids"]}
    batches = list(data.train_dataloader())
    assert len(batches) == 4
    bos = data.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "position_ids", "step_tokens"}
        ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
        starts = (positions == 0).nonzero().flatten().tolist()
        assert len(starts) == 2 and starts[0] == 0 and (ids[starts] == bos).all()
        assert (labels[starts] == IGNORE_INDEX).all()
        for start, end in zip(starts, [*starts[1:], len(ids)]):
            assert tuple(ids[start:end].tolist()) in lengths
            assert positions[start:end].tolist() == list(range(end - start))
        assert batch["step_tokens"].item() == int((labels != IGNORE_INDEX).sum())


def test_llama3_last_turn_with_bad_rows_skipped(llama3_tokenizer, sample_rows, caplog):
    # train_on last with a 512-token cut: rows 0 and 2 lose their last answer, so they are bad rows
    data = make(
        assets.llama3_tokenizer_dir(),
        llama3_tokenizer,
        train_size=4,
        val_size=0,
        test_size=0,
        max_length=512,
        train_on="last",
        on_bad_row="skip",
    )
    assert set(data.splits) == {"train"} and data.splits["train"]["row"] == [1, 3]
    assert "skipped 2 bad row(s) of 4 in the train split" in caplog.text
    assert data.pad_id == 128004 and data.tokenizer.eos_token_id == 128009
    for example in data.splits["train"]:
        expected = encode_conversation(sample_rows[example["row"]]["messages"], data.tokenizer, 512, "last")
        assert example["input_ids"] == expected["input_ids"] and example["labels"] == expected["labels"]
    with pytest.raises(ValueError, match="set data.test_size > 0"):
        data.test_dataloader()
    assert data.val_dataloader() == []


def test_configuration_errors(smollm2_tokenizer):
    with pytest.raises(ValueError, match="data.train_on must be 'all' or 'last'"):
        ChatDataModule(tokenizer_name_or_path="unused", train_on="first")
    data = make(assets.smollm2_dir(), smollm2_tokenizer, train_size=2, val_size=0, test_size=0, batch_size=4)
    with pytest.raises(ValueError, match="2 training conversations cannot fill one batch of 4"):
        data.train_dataloader()
    data = make(assets.smollm2_dir(), smollm2_tokenizer, train_size=0, val_size=16, test_size=0)
    with pytest.raises(ValueError, match="no training conversations"):
        data.train_dataloader()


def test_max_length_does_not_drop_test_rows(llama3_tokenizer):
    # rows 0 and 2 have their last answer beyond 512 tokens: bad rows for training, still fine test prompts
    data = make(
        assets.llama3_tokenizer_dir(), llama3_tokenizer, train_size=0, val_size=0, max_length=512, train_on="last"
    )
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert sorted(batch["row"]) == [0, 1, 2, 3]
    assert batch["attention_mask"][batch["row"].index(0)].sum() > 512  # the prompt is whole


def test_truncation_is_reported_once_per_split(smollm2_tokenizer, sample_rows, caplog):
    import logging

    max_length = 800  # cuts 7 of the 8 training conversations and 2 of the 4 validation ones
    with caplog.at_level(logging.WARNING, logger="capyft.datamodule"):
        data = make(assets.smollm2_dir(), smollm2_tokenizer, max_length=max_length)
    expected = []
    for name, rows in (("train", sample_rows[:8]), ("val", sample_rows[8:12])):
        labels = [encode_conversation(row["messages"], smollm2_tokenizer)["labels"] for row in rows]
        cut = [seq for seq in labels if len(seq) > max_length]
        lost = [sum(label != IGNORE_INDEX for label in seq[max_length:]) for seq in cut]
        kept = sum(sum(label != IGNORE_INDEX for label in seq[1:max_length]) for seq in labels)
        stats = data.stats[name]
        assert (stats["truncated"], stats["lost_rows"], stats["lost_tokens"]) == (len(cut), len(lost), sum(lost))
        assert stats["trained_tokens"] == kept
        expected.append(
            f"data.max_length {max_length} cut {len(cut)} of {len(rows)} {name} conversations; {len(lost)} of them "
            f"lost {sum(lost):,} assistant tokens ({sum(lost) / (sum(lost) + kept):.1%} of the split's trained "
            "tokens). Raise data.max_length to train on them"
        )
    assert [data.stats[name]["truncated"] for name in ("train", "val", "test")] == [7, 2, 0]  # test prompts: whole
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == expected


def test_no_cut_no_warning(smollm2_tokenizer, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="capyft.datamodule"):
        data = make(assets.smollm2_dir(), smollm2_tokenizer, max_length=2048)
    assert data.stats["train"]["truncated"] == 0 and data.stats["train"]["lost_tokens"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("world_size", [2, 3])
def test_val_rows_are_sharded_across_ranks_with_weightless_padding(smollm2_data, world_size):
    """Each rank validates its share (not the whole set); ranks short of a row get one with no trained token, so
    every rank runs the same number of batches and the trained tokens add up to one process's exactly once."""

    class Trainer:  # what val_dataloader reads of a trainer
        def __init__(self, rank):
            self.world_size, self.global_rank = world_size, rank

    val = smollm2_data.splits["val"]
    seen, trained, batches = [], 0, []
    for rank in range(world_size):
        smollm2_data.trainer = Trainer(rank)
        loader = list(smollm2_data.val_dataloader())
        batches.append(len(loader))
        for batch in loader:
            kept = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
            lengths = batch["attention_mask"].sum(dim=1)
            seen += [ids[:n].tolist() for ids, n, k in zip(batch["input_ids"], lengths, kept) if k > 0]
            trained += int(kept.sum())
    smollm2_data.trainer = None
    assert sorted(seen) == sorted(val["input_ids"])  # every row once, with its labels
    assert trained == sum(sum(label != IGNORE_INDEX for label in labels) for labels in val["labels"])
    assert len(set(batches)) == 1  # the same number of batches on every rank
