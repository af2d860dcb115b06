"""``python -m capyft data``: statistics, bad rows and highlighted trained tokens, without loading a model."""

import json
import re

import pytest

from capyft import assets, preview
from capyft.chat import IGNORE_INDEX, encode_conversation
from capyft.data import SAMPLE_DATA
from capyft.datamodule import ChatDataModule

# (fixture, tokenizer folder, end-of-turn token, whether the template trims message contents)
TOKENIZERS = [
    ("smollm2_tokenizer", assets.smollm2_dir, "<|im_end|>", False),
    ("llama3_tokenizer", assets.llama3_tokenizer_dir, "<|eot_id|>", True),
]


def examples_of(text):
    """The rendered conversations of a plain-text preview, after their ``--- ... ---`` titles."""
    return re.split(r"\n--- [^\n]* ---\n", text)[1:]


@pytest.mark.parametrize(("fixture", "folder", "eot", "trims"), TOKENIZERS, ids=["smollm2", "llama3"])
def test_highlighted_spans_are_exactly_the_assistant_turns(request, fixture, folder, eot, trims, sample_rows):
    tokenizer = request.getfixturevalue(fixture)
    data = ChatDataModule(str(folder()), str(SAMPLE_DATA), train_size=16, val_size=0, test_size=0, max_length=None)
    data.tokenizer = tokenizer
    data.setup("fit")
    report = preview.build_report(data, examples=16, split="train")
    expected = [
        [(m["content"].strip() if trims else m["content"]) + eot for m in row["messages"] if m["role"] == "assistant"]
        for row in sample_rows
    ]
    plain = examples_of(preview.format_text(report, "plain"))
    assert [re.findall("«(.*?)»", text, re.S) for text in plain] == expected
    # the markers wrap the rendered conversation and nothing else: without them it is the chat template's text
    rendered = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in sample_rows]
    assert [text.replace("«", "").replace("»", "").rstrip("\n") for text in plain] == [r.rstrip("\n") for r in rendered]
    ansi = preview.format_text(report, "ansi")
    runs = re.findall(re.escape(preview.ANSI_TRAINED) + "(.*?)" + re.escape(preview.ANSI_RESET), ansi, re.S)
    assert runs[1:] == [run for conversation in expected for run in conversation]  # [0]: the legend
    page = preview.format_html(report)
    assert len(re.findall("<mark>", page)) == 1 + sum(map(len, expected))


def conversation(i, answer_words):
    return {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": " ".join(["word"] * answer_words)},
        ]
    }


@pytest.fixture
def small_file(tmp_path):
    """Six conversations (answers of 5 to 80 words) and a bad row at index 2 (no assistant turn)."""
    rows = [conversation(i, n) for i, n in enumerate([5, 40, 0, 10, 80, 20])]
    rows[2] = {"messages": [{"role": "user", "content": "Only a question"}]}
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path, rows


def test_stats_bad_rows_and_page_without_loading_a_model(small_file, smollm2_tokenizer, tmp_path, capsys, monkeypatch):
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the data preview loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr("capyft.modeling.load_base_model", no_model)
    path, rows = small_file
    max_length = 60
    out = tmp_path / "page" / "preview.html"
    args = ["--model.model_name_or_path", str(assets.smollm2_dir()), "--data.source", str(path)]
    args += ["--data.train_size", "5", "--data.val_size", "1", "--data.test_size", "0"]
    args += ["--data.max_length", str(max_length), "--examples", "2", "--out", str(out)]
    assert preview.main(args) == 0
    text = capsys.readouterr().out

    # the same numbers, computed here from the encodings of the good training rows (0, 1, 3, 4)
    encoded = [encode_conversation(rows[i]["messages"], smollm2_tokenizer) for i in (0, 1, 3, 4)]
    full = [len(e["input_ids"]) for e in encoded]
    kept = sorted(min(n, max_length) for n in full)
    cut = [n > max_length for n in full]
    lost = [sum(label != IGNORE_INDEX for label in e["labels"][max_length:]) for e in encoded]
    trained = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:max_length]) for e in encoded)
    median = (kept[1] + kept[2]) / 2
    lost_text = f"{sum(x > 0 for x in lost)} ({sum(lost):,} tokens)"
    share = f"{trained / sum(kept):.1%}"
    median = f"{median:,.1f}" if median % 1 else f"{int(median):,}"
    expected = ["train", "4", str(kept[0]), median, str(kept[3]), str(kept[3]), str(sum(cut)), lost_text]
    train_line = next(line for line in text.splitlines() if line.startswith("train "))
    assert re.split(r"\s{2,}", train_line) == [*expected, share]
    assert sum(cut) == 2 and kept[0] < max_length  # the fixture covers both cut and whole conversations
    assert "1 bad row(s) (data.on_bad_row: error: fit stops at them):" in text
    assert "  train row 2: the conversation has no assistant turn, so there is nothing to train on" in text
    assert "--- train row 0: " in text and "--- train row 1: " in text and "--- train row 3" not in text
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "<td>train</td>" in page and "train row 2: the conversation" in page
    assert "<mark>word word word word word&lt;|im_end|&gt;</mark>" in page
    assert f"wrote {out}" in text


def test_reads_a_fit_config_and_its_overrides(tiny_model, capsys):
    args = ["--config", "configs/tiny.yaml", "--model.model_name_or_path", str(tiny_model), "--data.val_size", "3"]
    assert preview.main([*args, "--examples", "0", "--color", "never"]) == 0
    text = capsys.readouterr().out
    # configs/tiny.yaml: train_size 8, val_size 2 (overridden: 3), test_size 2, max_length 256
    sizes = {line.split()[0]: int(line.split()[1]) for line in text.splitlines()[3:6]}
    assert sizes == {"train": 8, "val": 3, "test": 2}
    assert "(max_length 256, train_on all;" in text and "---" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.batch_size", "0"], "data.batch_size: 0 must be >= 1 conversation per micro-batch"),
        (["--data.max_length", "-5"], "data.max_length: -5 must be a positive number of tokens"),
        (["--data.batch_size", "two"], 'Parser key "data.batch_size"'),
        (["--data.source", "./no-such.jsonl"], "data.source: ./no-such.jsonl does not exist"),
        (["--model.model_name_or_path", "./no-model"], "model.model_name_or_path: ./no-model does not exist"),
        (["--split", "nope", "--examples", "1"], "--split: no 'nope' conversations in this config"),
        (["--data.train_size", "99"], "train_size 99 + val_size 2 + test_size 2 = 103 rows, but the training split"),
    ],
)
def test_errors_are_one_line_with_status_2(tiny_model, capsys, args, message):
    base = ["--config", "configs/tiny.yaml", "--model.model_name_or_path", str(tiny_model)]
    assert preview.main([*base, *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "examples/s" not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert err[0].endswith("`python -m capyft data --help` lists every key")  # the format of every command


def test_malformed_jsonl_names_the_line(tiny_model, tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(conversation(0, 3))
    path.write_text(f"{good}\n{good}\n{good[:-5]}\n{good}\n", encoding="utf-8")
    assert preview.main(["--model.model_name_or_path", str(tiny_model), "--data.source", str(path)]) == 2
    err = capsys.readouterr().err
    column = good.rindex('"word') + 1  # the cut line ends inside the answer's string
    assert err.startswith(
        f"error: data.source: {path} line 3 is not valid JSON (Unterminated string starting at column {column}); "
        "fix or delete that line (each line of a .jsonl file holds one JSON object)"
    )
