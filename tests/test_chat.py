"""Chat rendering and label masking with real tokenizers: trained spans are exactly the assistant turns."""

import copy
import itertools

import pytest

from capyft.chat import (
    IGNORE_INDEX,
    encode_conversation,
    encode_prompt,
    end_of_turn_ids,
    split_prompt_reference,
    validate_conversation,
)

# (fixture, end-of-turn token, whether the template trims message contents)
TOKENIZERS = [("smollm2_tokenizer", "<|im_end|>", False), ("llama3_tokenizer", "<|eot_id|>", True)]


@pytest.fixture(params=TOKENIZERS, ids=["smollm2", "llama3"])
def chat_tokenizer(request):
    name, eot, trims = request.param
    return request.getfixturevalue(name), eot, trims


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(tokenizer, enc):
    """Decoded text of every contiguous run of trained positions, in order."""
    pairs = zip(enc["input_ids"], enc["labels"])
    runs = [list(run) for trained, run in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX) if trained]
    for run in runs:
        assert all(token == label for token, label in run), "a trained label differs from its input token"
    return [decode(tokenizer, [token for token, _ in run]) for run in runs]


def expected_runs(messages, eot, trims):
    return [(m["content"].strip() if trims else m["content"]) + eot for m in messages if m["role"] == "assistant"]


def full_rendering(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=False)


def with_template(tokenizer, template):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


def test_trained_runs_are_exactly_the_assistant_turns(chat_tokenizer, sample_rows):
    tokenizer, eot, trims = chat_tokenizer
    for row in sample_rows:
        messages = row["messages"]
        enc = encode_conversation(messages, tokenizer)
        assert len(enc["input_ids"]) == len(enc["labels"])
        assert trained_runs(tokenizer, enc) == expected_runs(messages, eot, trims)
        # the pieces-tokenization does not change the text
        assert decode(tokenizer, enc["input_ids"]) == full_rendering(tokenizer, messages)


def test_system_prompt_is_rendered_and_not_trained(chat_tokenizer, sample_rows):
    tokenizer, eot, trims = chat_tokenizer
    system = "You are a terse assistant."
    for row in sample_rows[:4]:
        messages = row["messages"]
        enc = encode_conversation(messages, tokenizer, system_prompt=system)
        rendered = full_rendering(tokenizer, [{"role": "system", "content": system}, *messages])
        assert decode(tokenizer, enc["input_ids"]) == rendered
        assert system in rendered
        assert trained_runs(tokenizer, enc) == expected_runs(messages, eot, trims)
    # a conversation that has its own system message keeps it
    own = [{"role": "system", "content": "Answer in French."}, *sample_rows[0]["messages"]]
    enc = encode_conversation(own, tokenizer, system_prompt=system)
    assert decode(tokenizer, enc["input_ids"]) == full_rendering(tokenizer, own)
    assert system not in decode(tokenizer, enc["input_ids"])


def test_train_on_last_trains_only_the_final_assistant_turn(chat_tokenizer, sample_rows):
    tokenizer, eot, trims = chat_tokenizer
    for row in sample_rows:
        messages = row["messages"]
        enc = encode_conversation(messages, tokenizer, train_on="last")
        assert trained_runs(tokenizer, enc) == expected_runs(messages, eot, trims)[-1:]
        assert enc["input_ids"] == encode_conversation(messages, tokenizer)["input_ids"]


def test_truncation_keeps_an_aligned_prefix(chat_tokenizer, sample_rows):
    tokenizer, _, _ = chat_tokenizer
    cut_everything = 0
    for row in sample_rows:
        whole = encode_conversation(row["messages"], tokenizer)
        for max_length in (40, 100, 300, 700, len(whole["input_ids"]) + 5):
            if all(label == IGNORE_INDEX for label in whole["labels"][:max_length]):
                with pytest.raises(ValueError, match=f"max_length={max_length} cuts every trained token"):
                    encode_conversation(row["messages"], tokenizer, max_length=max_length)
                cut_everything += 1
                continue
            cut = encode_conversation(row["messages"], tokenizer, max_length=max_length)
            assert cut["input_ids"] == whole["input_ids"][:max_length]
            assert cut["labels"] == whole["labels"][:max_length]
    assert cut_everything > 0, "no max_length above cut all trained tokens; the error path went untested"


def test_all_cut_conversation_raises(chat_tokenizer):
    tokenizer, _, _ = chat_tokenizer
    messages = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Fine."}]
    with pytest.raises(ValueError, match="cuts every trained token"):
        encode_conversation(messages, tokenizer, max_length=50)
    with pytest.raises(ValueError, match="max_length must be positive"):
        encode_conversation(messages, tokenizer, max_length=0)


def test_whitespace_of_assistant_content(chat_tokenizer):
    """ChatML keeps "  Hello  " as written, so all of it is trained; Llama-3.1 trims it, so the trimmed text is."""
    tokenizer, eot, trims = chat_tokenizer
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  Hello there.  "},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "\nHello again\n"},
    ]
    enc = encode_conversation(messages, tokenizer)
    assert trained_runs(tokenizer, enc) == expected_runs(messages, eot, trims)
    assert decode(tokenizer, enc["input_ids"]) == full_rendering(tokenizer, messages)


def test_end_of_turn_ids(smollm2_tokenizer, llama3_tokenizer):
    assert end_of_turn_ids(smollm2_tokenizer) == [smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert end_of_turn_ids(llama3_tokenizer) == [128009]


def test_prompt_ends_with_the_generation_prompt(chat_tokenizer, sample_rows):
    tokenizer, _, _ = chat_tokenizer
    messages = sample_rows[0]["messages"]
    prompt, reference = split_prompt_reference(messages)
    assert reference == messages[-1]["content"] and prompt == messages[:-1]
    ids = encode_prompt(prompt, tokenizer)
    assert decode(tokenizer, ids) == tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    header = "<|im_start|>assistant\n" if tokenizer.eos_token == "<|im_end|>" else "assistant<|end_header_id|>\n\n"
    assert decode(tokenizer, ids).endswith(header)
    # the prompt tokens are exactly the start of the training encoding of the conversation up to that answer
    assert encode_conversation(messages, tokenizer)["input_ids"][: len(ids)] == ids


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "no messages"),
        (None, "no messages"),
        ("Hello", "no messages"),
        ([{"role": "user"}], "not a {role, content} mapping"),
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'tool'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "content of type int"),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "y"}], "content of type NoneType"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}], "message 1 .assistant. has empty"),
        ([{"role": "user", "content": "x"}], "no assistant turn"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "y"},
            ],
            "system message may only come first",
        ),
    ],
)
def test_invalid_conversations_raise(messages, problem, smollm2_tokenizer):
    with pytest.raises(ValueError, match=problem):
        validate_conversation(messages)
    with pytest.raises(ValueError, match=problem):
        encode_conversation(messages, smollm2_tokenizer)


def test_bad_arguments_raise(smollm2_tokenizer, sample_rows):
    with pytest.raises(ValueError, match="train_on must be 'all' or 'last'"):
        encode_conversation(sample_rows[0]["messages"], smollm2_tokenizer, train_on="first")


def test_conversation_the_template_cannot_render(smollm2_tokenizer):
    ok = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    # a template that refuses some conversations, as the templates that require alternating roles do
    strict = with_template(
        smollm2_tokenizer,
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% endfor %}"
        + smollm2_tokenizer.chat_template,
    )
    assert trained_runs(strict, encode_conversation(ok, strict)) == ["Hello<|im_end|>"]
    with pytest.raises(ValueError, match="cannot render this conversation: Conversation roles must alternate"):
        encode_conversation([ok[0], *ok], strict)
    # no template can render the (empty) prompt of an opening assistant message
    with pytest.raises(ValueError, match="opens with an assistant message"):
        encode_conversation([ok[1], *ok], smollm2_tokenizer)


def test_templates_capyft_cannot_derive_spans_from(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    base = smollm2_tokenizer.chat_template
    with pytest.raises(ValueError, match="not render message 1 as an extension"):
        encode_conversation(messages, with_template(smollm2_tokenizer, "{{ messages | length }}" + base))
    with pytest.raises(ValueError, match="changes assistant content beyond trimming"):
        encode_conversation(messages, with_template(smollm2_tokenizer, base.replace("message['content']", "'X'")))
    with pytest.raises(ValueError, match="no special token"):
        encode_conversation(messages, with_template(smollm2_tokenizer, base.replace("'<|im_end|>' + '\n'", "'\n'")))
    with pytest.raises(ValueError, match="has no chat template"):
        encode_conversation(messages, with_template(smollm2_tokenizer, None))
