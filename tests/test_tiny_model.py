"""The embedded default model and tokenizer: built locally, round-tripping exactly."""

from tokenizers import Tokenizer

from preference_dpo.tiny_model import DEFAULT_SYSTEM_PROMPT

SAMPLES = [
    "How do I boil an egg?  First, place the egg in boiling water.",
    "Numbers 12345 and   spaces\n\n\nnew lines\tand tabs",
    "请提供一个有用、诚实、无害且简洁的回答。",
    "It's, we'll, I'd: contractions; émigré café naïve",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def test_saved_tokenizer_round_trips_through_autotokenizer(tiny_model_dir, tokenizer):
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    for text in SAMPLES:
        ids = tokenizer(text)["input_ids"]
        assert ids == raw.encode(text).ids, text
        assert tokenizer.decode(ids) == text


def test_chat_template_is_qwen25s(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        text
        == f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # special tokens are single ids; the instruction texts are compact
    assert len(tokenizer("<|im_start|>")["input_ids"]) == 1
    assert len(tokenizer("请提供一个有用、诚实、无害且简洁的回答。")["input_ids"]) < 10


def test_model_is_a_small_qwen2_with_matching_vocab(tiny_model_dir, tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen2" and config.vocab_size == len(tokenizer)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2


def test_embedded_model_build_is_deterministic_recorded_and_rebuilt_when_its_recipe_changes(tmp_path):
    """A short build (the real one pretrains for longer): same weights twice, whatever the process's thread count
    (the README's demo numbers rest on that), a recipe stamp, stale detection."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    from preference_dpo import tiny_model

    data = tmp_path / "data"
    shutil.copytree(tiny_model.DEFAULT_DATA_DIR, data)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = tiny_model.build_embedded_model(tmp_path / "a", data, steps=4)
        torch.set_num_threads(2)
        second = tiny_model.build_embedded_model(tmp_path / "b", data, steps=4)
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((first / tiny_model.BUILD_INFO).read_text())
    assert info["pretraining"]["steps"] == 4 and info["held_out_pairs"] == 128
    assert {"pair_accuracy_without_instruction", "pair_accuracy_with_instruction"} <= set(info)
    assert tiny_model.is_current(first, data)

    stamp = (first / tiny_model.BUILD_INFO).stat().st_mtime_ns
    tiny_model.main(["--output_dir", str(first), "--data_dir", str(data), "--if_needed", "--steps", "4"])
    assert (first / tiny_model.BUILD_INFO).stat().st_mtime_ns == stamp  # current: not rebuilt

    with open(data / "test.jsonl", "a", encoding="utf-8") as f:
        f.write((data / "train.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n")
    assert not tiny_model.is_current(first, data)  # other data: the launcher rebuilds it
    (first / tiny_model.BUILD_INFO).unlink()
    assert not tiny_model.is_current(first, data)  # an older, random-weight embedded model has no stamp
