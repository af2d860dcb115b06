"""Loading, checking, splitting and tokenizing chat data; batching it for training.

Plain functions and a collator, no Lightning: :mod:`capyft.datamodule` wires them into a ``LightningDataModule``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from capyft.chat import IGNORE_INDEX, encode_conversation, validate_conversation
from capyft.checks import check_jsonl

log = logging.getLogger(__name__)

BadRow = Literal["error", "skip"]
SAMPLE_DATA = Path(__file__).parent / "sample_data" / "capybara_sample.jsonl"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_source(source: str | Path) -> Any:
    """Loads a chat data set as a ``datasets.DatasetDict``.

    Args:
        source: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a ``save_to_disk`` directory, a directory of such
            files, or a Hugging Face hub id such as ``trl-lib/Capybara``.
    """
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"data file {path} has an unsupported type; use .jsonl, .json, .parquet or .csv")
        if path.suffix.lower() == ".jsonl":
            check_jsonl(path)  # names the line of a malformed row, which datasets' own error buries
        return datasets.load_dataset(builder, data_files={"train": str(path)})
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        return datasets.load_dataset(str(path))
    if str(source).startswith((".", "/", "~")) or Path(str(source)).suffix in _FILE_BUILDERS:
        raise FileNotFoundError(f"data source {source} does not exist; give an existing file or directory, or a hub id")
    return datasets.load_dataset(str(source))


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Reads a row of either schema as ``{role, content}`` messages.

    Accepts trl's ``messages`` ([{role, content}]) and LDJnr's ``conversation`` ([{input, output}]).
    """
    if "messages" in row and row["messages"] is not None:
        return row["messages"]
    if "conversation" in row and row["conversation"] is not None:
        messages = []
        for turn in row["conversation"]:
            if not isinstance(turn, dict) or "input" not in turn or "output" not in turn:
                raise ValueError(f"a conversation turn is not an {{input, output}} mapping: {str(turn)[:80]!r}")
            messages += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
        return messages
    raise ValueError(
        f"row has neither a 'messages' nor a 'conversation' column, or both are empty (columns: {sorted(row)}); "
        "use trl's messages schema or LDJnr's conversation schema"
    )


def _take(pool: Any, start: int, size: int) -> Any:
    # datasets rejects an empty range that starts at the end (IndexError), which an empty last split would be
    return pool.select(range(start, start + size) if size else [])


def split_source(
    data: Any,
    train_size: int | None,
    val_size: int,
    test_size: int,
    shuffle: bool = False,
    seed: int = 42,
) -> dict[str, Any]:
    """Splits a ``DatasetDict`` into disjoint train / val / test sets.

    The training pool is the ``train`` split (or the only split), in stored order unless ``shuffle``. ``train`` is
    its first ``train_size`` rows (all that remain when None), ``val`` the next ``val_size``. ``test`` is the
    source's ``test`` split (its first ``test_size`` rows) when it has one, otherwise the ``test_size`` rows after
    ``val`` in the pool. Every row keeps its source index in the column ``row``.
    """
    names = list(data.keys())
    pool = data["train"] if "train" in data else data[names[0]]
    pool = pool.add_column("row", list(range(len(pool))))
    if shuffle:
        pool = pool.shuffle(seed=seed)
    has_test = "test" in data and test_size > 0
    carved = val_size + (0 if has_test else test_size)
    if train_size is None:
        train_size = max(0, len(pool) - carved)  # too little left: the size check below explains it
    for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if train_size + carved > len(pool):
        test_part = "" if has_test else f" + test_size {test_size}"
        raise ValueError(
            f"train_size {train_size} + val_size {val_size}{test_part} = {train_size + carved} rows, but the "
            f"training split has only {len(pool)}; lower the sizes"
        )
    splits = {"train": _take(pool, 0, train_size), "val": _take(pool, train_size, val_size)}
    if has_test:
        test = data["test"]
        if test_size > len(test):
            raise ValueError(f"test_size {test_size} exceeds the {len(test)} rows of the source's test split")
        splits["test"] = _take(test.add_column("row", list(range(len(test)))), 0, test_size)
    else:
        splits["test"] = _take(pool, train_size + val_size, test_size)
    return splits


def tokenize_split(
    split: Any,
    tokenizer: Any,
    name: str,
    max_length: int | None,
    train_on: str = "all",
    system_prompt: str | None = None,
    on_bad_row: BadRow = "error",
    bad_rows: list[tuple[int, str]] | None = None,
) -> Any:
    """Encodes every row of a split (``datasets.map``, cached) and handles bad rows.

    Args:
        bad_rows: when given, every bad row is appended to it as ``(row, error)``.

    Returns:
        The split with ``input_ids``, ``labels``, ``messages`` and ``row`` columns, plus ``full_length`` (tokens
        before the ``max_length`` cut) and ``lost_trained`` (trained tokens the cut removed).

    Raises:
        ValueError: with ``on_bad_row="error"``, on the first bad row, naming it; also when no usable row is left.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        try:
            messages = validate_conversation(to_messages(row))
            enc = encode_conversation(messages, tokenizer, None, train_on, system_prompt)
            full_length, lost = len(enc["input_ids"]), 0
            if max_length is not None and full_length > max_length:
                enc, lost = cut(enc, max_length)
            return {**enc, "messages": messages, "full_length": full_length, "lost_trained": lost, "error": ""}
        except ValueError as err:  # every problem with a row's content is a ValueError
            empty = {"input_ids": [], "labels": [], "messages": [], "full_length": 0, "lost_trained": 0}
            return {**empty, "error": str(err)}

    import datasets

    keep = ["row"]
    # Explicit types: inferred from the first 1,000 rows, a batch of bad rows alone would type the columns as
    # lists of nulls, and the next good row fails to cast.
    string = datasets.Value("string")
    features = datasets.Features(
        {
            **{column: split.features[column] for column in keep},
            "input_ids": [datasets.Value("int32")],
            "labels": [datasets.Value("int32")],
            "messages": [{"role": string, "content": string}],
            "full_length": datasets.Value("int32"),
            "lost_trained": datasets.Value("int32"),
            "error": string,
        }
    )
    encoded = split.map(
        encode,
        remove_columns=[c for c in split.column_names if c not in keep],
        features=features,
        desc=f"tokenize {name}",
    )
    errors = [(r, e) for r, e in zip(encoded["row"], encoded["error"]) if e]
    if bad_rows is not None:
        bad_rows.extend(errors)
    if errors:
        first = "; ".join(f"row {r}: {e}" for r, e in errors[:3])
        if on_bad_row == "error":
            raise ValueError(
                f"{len(errors)} bad row(s) in the {name} split. {first}. Fix the data or set on_bad_row: skip"
            )
        log.warning("skipped %d bad row(s) of %d in the %s split; first: %s", len(errors), len(encoded), name, first)
        encoded = encoded.filter(lambda e: not e, input_columns="error")
    if len(split) > 0 and len(encoded) == 0:
        raise ValueError(f"the {name} split has no usable row left; check the data source")
    return encoded.remove_columns("error")


def cut(enc: dict[str, list[int]], max_length: int) -> tuple[dict[str, list[int]], int]:
    """Right-truncates an encoded conversation to ``max_length`` tokens (labels stay aligned).

    Returns:
        The cut encoding and how many trained tokens the cut removed.

    Raises:
        ValueError: ``max_length`` is not positive, or the cut removes every trained token.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    ids, labels = enc["input_ids"][:max_length], enc["labels"][:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(
            f"max_length={max_length} cuts every trained token of this conversation ({len(ids)} tokens kept); "
            "raise max_length or drop the row"
        )
    lost = sum(label != IGNORE_INDEX for label in enc["labels"][max_length:])
    return {"input_ids": ids, "labels": labels}, lost


def split_stats(split: Any) -> dict[str, Any]:
    """Token statistics of a tokenized split (see :func:`tokenize_split`), for the truncation warning and the data
    preview.

    Returns:
        ``conversations``; token lengths after the cut (``min``, ``median``, ``p95``, ``max``; nearest rank);
        ``truncated``: conversations the ``max_length`` cut shortened; ``lost_rows``: those of them that lost
        trained (assistant) tokens, ``lost_tokens``: how many; ``trained_tokens`` and ``tokens`` kept, and
        ``trained_share`` = trained / all tokens kept.
    """
    kept = [len(ids) for ids in split["input_ids"]]
    lengths = sorted(kept)
    full, lost = split["full_length"], split["lost_trained"]
    trained = sum(trained_token_counts(split["labels"]))
    n = len(lengths)
    stats: dict[str, Any] = {"conversations": n}
    if n:
        stats.update(
            min=lengths[0],
            median=lengths[(n - 1) // 2] if n % 2 else (lengths[n // 2 - 1] + lengths[n // 2]) / 2,
            p95=lengths[math.ceil(0.95 * n) - 1],
            max=lengths[-1],
        )
    tokens = sum(lengths)
    stats.update(
        truncated=sum(f > k for f, k in zip(full, kept)),
        lost_rows=sum(x > 0 for x in lost),
        lost_tokens=sum(lost),
        trained_tokens=trained,
        tokens=tokens,
        trained_share=trained / tokens if tokens else 0.0,
    )
    return stats


def truncation_message(name: str, stats: dict[str, Any], max_length: int | None) -> str | None:
    """One line saying what the ``max_length`` cut removed from a split, or None when it cut nothing."""
    if not stats["truncated"]:
        return None
    lost = stats["lost_tokens"]
    share = lost / (lost + stats["trained_tokens"]) if lost else 0.0
    return (
        f"data.max_length {max_length} cut {stats['truncated']} of {stats['conversations']} {name} conversations; "
        f"{stats['lost_rows']} of them lost {lost:,} assistant tokens ({share:.1%} of the split's trained tokens). "
        "Raise data.max_length to train on them"
    )


def trained_token_counts(labels: list[list[int]]) -> list[int]:
    """Trained tokens per sequence, counting only labels that a next-token loss can use (not the first position)."""
    return [sum(label != IGNORE_INDEX for label in seq[1:]) for seq in labels]
