"""Both views: instruction placement, shared completion tokens, truncation, collation, soft prompts."""

import pickle

import pytest
import torch

from preference_dpo.collator import PreferenceViewsCollator
from preference_dpo.errors import UserInputError
from preference_dpo.instruction import insert_instruction
from preference_dpo.soft_prompt import load_prompt_embedding
from preference_dpo.views import tokenize_preference_dataset, tokenize_views

P = "Be concise."
CONV = {
    "prompt": [{"role": "user", "content": "How do I boil an egg?"}],
    "chosen": [{"role": "assistant", "content": "First, place the egg in boiling water."}],
    "rejected": [{"role": "assistant", "content": "I cannot help with that request."}],
}
PLAIN = {"prompt": "How do I boil an egg?", "chosen": " Boil it.", "rejected": " No."}


def test_instruction_placement():
    assert insert_instruction("Q?", P) == "Be concise.\n\nQ?"
    user = [{"role": "user", "content": "Q?"}]
    assert insert_instruction(user, P, "system") == [{"role": "system", "content": P}, *user]
    system = [{"role": "system", "content": "You are kind."}, *user]
    assert insert_instruction(system, P, "system")[0] == {"role": "system", "content": "You are kind.\n\nBe concise."}
    assert insert_instruction(system, P, "user")[1] == {"role": "user", "content": "Be concise.\n\nQ?"}
    assert system[0]["content"] == "You are kind."  # the input is not modified
    assert insert_instruction(user, P, "system", default_system="You are Qwen.")[0] == {
        "role": "system",
        "content": "You are Qwen.\n\nBe concise.",
    }


def test_template_default_system_is_found_and_kept_in_the_guided_view(tokenizer):
    from preference_dpo.instruction import template_default_system
    from preference_dpo.tiny_model import DEFAULT_SYSTEM_PROMPT

    default = template_default_system(tokenizer)
    assert default == DEFAULT_SYSTEM_PROMPT
    out = tokenize_views(CONV, tokenizer, P, "system", 0, 300, default_system=default)
    guided = tokenizer.decode(out["guided_prompt_ids"])
    assert guided.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}\n\n{P}<|im_end|>")
    # the base prompt is the guided one without the instruction
    assert tokenizer.decode(out["prompt_ids"]) == guided.replace(f"\n\n{P}", "")


@pytest.mark.parametrize("example", [CONV, PLAIN], ids=["conversational", "plain"])
def test_views_share_completion_tokens_and_guided_prompt_holds_instruction(tokenizer, example):
    out = tokenize_views(example, tokenizer, P, "system", num_soft_tokens=0, max_length=300)
    assert not out["truncated"]
    base_text = tokenizer.decode(out["prompt_ids"])
    guided_text = tokenizer.decode(out["guided_prompt_ids"])
    assert P not in base_text and P in guided_text
    assert guided_text.endswith(base_text[-10:])  # both end on the same generation prompt / question
    chosen_text = tokenizer.decode(out["chosen_ids"])
    assert ("place the egg" in chosen_text) if example is CONV else chosen_text.startswith(" Boil it.")
    if example is PLAIN:
        assert out["chosen_ids"][-1] == tokenizer.eos_token_id  # EOS added to plain-text completions, as TRL does


def test_truncation_keeps_identical_completions_within_max_length(tokenizer):
    from preference_dpo.instruction import template_default_system

    default = template_default_system(tokenizer)
    full = tokenize_views(CONV, tokenizer, P, "system", 0, max_length=300, default_system=default)
    max_length = len(full["guided_prompt_ids"]) + 3
    out = tokenize_views(CONV, tokenizer, P, "system", 0, max_length=max_length, default_system=default)
    assert out["truncated"]
    assert out["chosen_ids"] == full["chosen_ids"][:3]
    assert len(out["guided_prompt_ids"]) + len(out["chosen_ids"]) == max_length
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) < max_length


def test_embedding_mode_appends_placeholders_after_the_prompt(tokenizer):
    out = tokenize_views(CONV, tokenizer, None, "system", num_soft_tokens=3, max_length=300)
    assert out["guided_prompt_ids"] == out["prompt_ids"] + [tokenizer.pad_token_id] * 3
    assert tokenizer.decode(out["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_dataset_drops_long_prompts_and_errors_when_none_left(tokenizer):
    from datasets import Dataset

    long = dict(PLAIN, prompt="word " * 200)
    dataset = Dataset.from_list([PLAIN, long])
    kwargs = dict(name="train", preference_text=P, preference_position="system", num_soft_tokens=0, max_length=300)
    kept = tokenize_preference_dataset(dataset, tokenizer, max_prompt_length=64, **kwargs)
    assert len(kept) == 1 and "truncated" not in kept.column_names
    with pytest.raises(
        UserInputError, match=r"All 2 train pairs were dropped.*MAX_PROMPT_LENGTH \(--max_prompt_length\) = 4"
    ):
        tokenize_preference_dataset(dataset, tokenizer, max_prompt_length=4, **kwargs)
    with pytest.raises(UserInputError, match="5 virtual tokens"):
        tokenize_preference_dataset(dataset, tokenizer, **{**kwargs, "num_soft_tokens": 5}, max_prompt_length=5)


def test_collator_builds_guided_batch_with_soft_token_mask():
    examples = [
        {"prompt_ids": [1, 2], "guided_prompt_ids": [1, 2, 0, 0], "chosen_ids": [5, 6], "rejected_ids": [7]},
        {"prompt_ids": [3], "guided_prompt_ids": [3, 0, 0], "chosen_ids": [8], "rejected_ids": [9, 10, 11]},
    ]
    batch = PreferenceViewsCollator(pad_token_id=0, num_soft_tokens=2, guided_forward="full")(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 5, 6], [3, 8, 0, 0], [1, 2, 7, 0], [3, 9, 10, 11]]
    assert batch["guided_input_ids"].tolist() == [
        [1, 2, 0, 0, 5, 6],
        [3, 0, 0, 8, 0, 0],
        [1, 2, 0, 0, 7, 0],
        [3, 0, 0, 9, 10, 11],
    ]
    assert batch["guided_soft_token_mask"].int().tolist() == [
        [0, 0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 0],
    ]
    soft = batch["guided_soft_token_mask"]
    assert (batch["guided_attention_mask"][soft] == 1).all()  # soft tokens are attended to
    assert (batch["guided_completion_mask"][soft] == 0).all()  # and never scored
    # identical completion tokens in both views
    for row in range(4):
        base = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        guided = batch["guided_input_ids"][row][batch["guided_completion_mask"][row].bool()]
        assert torch.equal(base, guided)


# --- the embedding file ---


@pytest.mark.parametrize(
    "content",
    [torch.randn(3, 8), torch.randn(8), {"prompt_embeddings": torch.randn(3, 8), "step": 100}],
    ids=["2d", "1d", "dict"],
)
def test_embedding_file_accepted_forms(tmp_path, content):
    path = tmp_path / "e.pt"
    torch.save(content, path)
    tensor = load_prompt_embedding(path, hidden_size=8)
    assert tensor.dtype == torch.float32 and tensor.shape[1] == 8 and tensor.shape[0] in (1, 3)


def test_embedding_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.ones(2, 8)}, tmp_path / "e.safetensors")
    assert torch.equal(load_prompt_embedding(tmp_path / "e.safetensors", 8), torch.ones(2, 8))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.randn(3, 5), "embedding dimension is 5 but the model's hidden size is 8"),
        (torch.randn(2, 3, 8), r"shape \(2, 3, 8\)"),
        (torch.full((2, 8), float("nan")), "NaN or Inf"),
        (torch.empty(0, 8), "empty"),
        (torch.ones(2, 8, dtype=torch.long), "floating point"),
        ({"a": torch.randn(2, 8), "b": torch.randn(2, 8)}, "exactly one 2-D float tensor.*found 2"),
        ({"a": 1}, "found 0"),
        ([1, 2], "holds a list, not a tensor"),
    ],
)
def test_embedding_file_errors(tmp_path, content, message):
    path = tmp_path / "e.pt"
    torch.save(content, path)
    with pytest.raises(UserInputError, match=message):
        load_prompt_embedding(path, hidden_size=8)


def test_embedding_file_missing_or_not_a_tensor_file(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        load_prompt_embedding(tmp_path / "missing.pt", 8)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a tensor")
    with pytest.raises(UserInputError, match="cannot be read as a tensor file"):
        load_prompt_embedding(junk, 8)


class _Exploit:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"prompt_embeddings": _Exploit(str(marker))}, f)
    with pytest.raises(UserInputError, match="pickled Python objects, which are refused"):
        load_prompt_embedding(path, 8)
    assert not marker.exists()


def test_collator_shared_prompt_layout():
    examples = [
        {"prompt_ids": [1, 2], "guided_prompt_ids": [1, 2, 0, 0], "chosen_ids": [5, 6], "rejected_ids": [7]},
        {"prompt_ids": [3], "guided_prompt_ids": [3, 0, 0], "chosen_ids": [8], "rejected_ids": [9, 10, 11]},
    ]
    batch = PreferenceViewsCollator(pad_token_id=0, num_soft_tokens=2)(examples)  # shared_prompt is the default
    assert batch["guided_prompt_input_ids"].tolist() == [[1, 2, 0, 0], [0, 3, 0, 0]]  # left-padded
    assert batch["guided_prompt_attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch["guided_prompt_soft_token_mask"].int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert batch["guided_completion_ids"].tolist() == [[5, 6, 0], [8, 0, 0], [7, 0, 0], [9, 10, 11]]
    assert batch["guided_completion_attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]]
    assert "guided_input_ids" not in batch


def test_default_system_message_log_counts_the_prompts_it_applies_to(tokenizer, caplog):
    from datasets import Dataset

    own = dict(CONV, prompt=[{"role": "system", "content": "You are kind."}, *CONV["prompt"]])
    kwargs = dict(name="train", preference_text=P, preference_position="system", num_soft_tokens=0, max_length=300)
    caplog.set_level("INFO", logger="preference_dpo.views")
    tokenize_preference_dataset(Dataset.from_list([own, CONV]), tokenizer, max_prompt_length=128, **kwargs)
    assert "default system message is kept in 1 of 2 train prompts" in caplog.text
    caplog.clear()
    tokenize_preference_dataset(Dataset.from_list([own, own]), tokenizer, max_prompt_length=128, **kwargs)
    assert "default system message" not in caplog.text  # every prompt brings its own


# --- both views cut by the same rule (the guided prompt never keeps a token the response re-tokenizes) ---

HH_EXPLICIT = {
    "prompt": "\n\nHuman: What is the capital of France?\n\nAssistant: ",
    "chosen": "Paris, of course.",
    "rejected": "London, I think.",
}
HH_IMPLICIT = {
    "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris, of course.",
    "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: London, I think.",
}


def think_tokenizer(tokenizer):
    """The tiny tokenizer with a chat template whose generation prompt opens a `<think>` block that the rendered
    assistant turn does not have (as in several current reasoning models)."""
    import copy

    from preference_dpo.tiny_model import QWEN25_CHAT_TEMPLATE

    generation_prompt = "{{- '<|im_start|>assistant\\n' }}"
    assert QWEN25_CHAT_TEMPLATE.count(generation_prompt) == 1
    think = copy.deepcopy(tokenizer)
    think.chat_template = QWEN25_CHAT_TEMPLATE.replace(generation_prompt, "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    return think


def assert_views_differ_by_the_instruction_only(tokenizer, out, with_instruction):
    """Both views score the same response ids, and the guided context is the base context with `P` inserted."""
    base, guided = tokenizer.decode(out["prompt_ids"]), tokenizer.decode(out["guided_prompt_ids"])
    assert guided == with_instruction(base)
    # each view's ids are the tokenization of its whole sequence, split where the response starts
    for key in ("chosen_ids", "rejected_ids"):
        for prompt_key in ("prompt_ids", "guided_prompt_ids"):
            whole = tokenizer(text=tokenizer.decode(out[prompt_key] + out[key]))["input_ids"]
            assert whole == out[prompt_key] + out[key], (key, prompt_key)
    assert out["views_match"]


ANSWER_COLON = {"prompt": "Question: how do I boil an egg?\nAnswer: ", "chosen": "Boil it.", "rejected": "No."}


@pytest.mark.parametrize("example", [HH_EXPLICIT, ANSWER_COLON], ids=["hh_assistant_colon", "answer_colon"])
def test_plain_prompt_ending_in_a_space_is_cut_in_both_views(tokenizer, example):
    """`"...Assistant: "` + `"Paris"` tokenizes as `"...Assistant:"` + `" Paris"`: the space belongs to the
    response in both views, never twice to the guided sequence."""
    out = tokenize_views(example, tokenizer, P, "system", 0, 300)
    assert not tokenizer.decode(out["prompt_ids"]).endswith(" ")
    assert_views_differ_by_the_instruction_only(tokenizer, out, lambda base: f"{P}\n\n{base}")
    assert tokenizer.decode(out["chosen_ids"]).startswith(" ")


def test_implicit_prompt_pair_views_differ_by_the_instruction_only(tokenizer):
    from preference_dpo.data import normalize_row

    example = normalize_row(HH_IMPLICIT, "hh line 1")
    out = tokenize_views(example, tokenizer, P, "system", 0, 300)
    assert_views_differ_by_the_instruction_only(tokenizer, out, lambda base: f"{P}\n\n{base}")
    assert tokenizer.decode(out["chosen_ids"]) == " Paris, of course.<|im_end|>"


def test_generation_prompt_the_assistant_turn_renders_differently_is_cut_in_both_views(tokenizer):
    """Generation prompt `...assistant\\n<think>\\n`, assistant turn `...assistant\\n{content}`: both views end
    where the two renderings part, so the guided sequence does not hold `<think>` the base one lacks."""
    from preference_dpo.instruction import template_default_system
    from preference_dpo.tiny_model import DEFAULT_SYSTEM_PROMPT

    think = think_tokenizer(tokenizer)
    out = tokenize_views(CONV, think, P, "system", 0, 300, default_system=template_default_system(think))
    base, guided = think.decode(out["prompt_ids"]), think.decode(out["guided_prompt_ids"])
    assert "<think>" not in guided and base.endswith("<|im_start|>assistant\n")
    assert guided == base.replace(DEFAULT_SYSTEM_PROMPT, f"{DEFAULT_SYSTEM_PROMPT}\n\n{P}")
    assert think.decode(out["chosen_ids"]).startswith("First, place the egg")
    guided_prompt = [{"role": "system", "content": f"{DEFAULT_SYSTEM_PROMPT}\n\n{P}"}, *CONV["prompt"]]
    for key, side in (("chosen_ids", "chosen"), ("rejected_ids", "rejected")):
        whole = think.apply_chat_template(guided_prompt + CONV[side], tokenize=True, return_dict=True)["input_ids"]
        assert list(whole) == out["guided_prompt_ids"] + out[key]
    assert out["views_match"]


def test_pairs_whose_responses_tokenize_differently_with_the_instruction_are_dropped(tokenizer, caplog):
    """A template that renders the assistant turn differently when a system message is present: the two views
    cannot score the same response ids, so the pair is dropped and counted (an error if no pair is left)."""
    import copy

    from datasets import Dataset

    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'assistant' and messages[0].role == 'system' %}{{- '> ' }}{%- endif %}"
        "{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    with_system = {**CONV, "prompt": [{"role": "system", "content": "Be kind."}, *CONV["prompt"]]}
    kwargs = dict(name="train", preference_text=P, preference_position="system", num_soft_tokens=0, max_length=300)
    with caplog.at_level("WARNING"):
        kept = tokenize_preference_dataset(Dataset.from_list([CONV, with_system]), odd, max_prompt_length=200, **kwargs)
    assert len(kept) == 1 and kept[0]["prompt_ids"] != tokenize_views(CONV, odd, P, "system", 0, 300)["prompt_ids"]
    assert "views_match" not in kept.column_names
    assert "Dropped 1 of 2 train pairs whose response tokens differ" in caplog.text
    with pytest.raises(UserInputError, match=r"All 1 train pairs were dropped.*response tokens differ"):
        tokenize_preference_dataset(Dataset.from_list([CONV]), odd, max_prompt_length=200, **kwargs)


# --- chat templates without a system role (Gemma, Mistral v0.1 style) ---

# Gemma's rule, in the tiny tokenizer's tokens: a system message raises, as `raise_exception` does there.
NO_SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def no_system_tokenizer(tokenizer):
    import copy

    without = copy.deepcopy(tokenizer)
    without.chat_template = NO_SYSTEM_TEMPLATE
    return without


def test_a_template_without_system_role_takes_the_instruction_in_the_user_turn(no_system_tokenizer):
    from datasets import Dataset

    dataset = Dataset.from_list([CONV, CONV])
    kwargs = dict(name="train", preference_text=P, num_soft_tokens=0, max_length=300, max_prompt_length=128)
    kept = tokenize_preference_dataset(dataset, no_system_tokenizer, preference_position="user", **kwargs)
    guided = no_system_tokenizer.decode(kept[0]["guided_prompt_ids"])
    assert guided == f"<|im_start|>user\n{P}\n\nHow do I boil an egg?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(UserInputError, match=r"does not accept a system message.*PREFERENCE_POSITION=user"):
        tokenize_preference_dataset(dataset, no_system_tokenizer, preference_position="system", **kwargs)


def test_a_system_message_in_the_data_for_a_template_without_one_is_one_line(no_system_tokenizer):
    """PREFERENCE_POSITION=user, but the data's own prompts carry a system message the template refuses."""
    from datasets import Dataset

    with_system = {**CONV, "prompt": [{"role": "system", "content": "Be brief."}, *CONV["prompt"]]}
    kwargs = dict(name="train", preference_text=P, num_soft_tokens=0, max_length=300, max_prompt_length=128)
    with pytest.raises(UserInputError, match=r"refuses a conversation of the data \(roles: system, user\).*Remove the"):
        tokenize_preference_dataset(Dataset.from_list([with_system]), no_system_tokenizer, preference_position="user",
                                    **kwargs)  # fmt: skip
