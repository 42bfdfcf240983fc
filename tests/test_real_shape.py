"""bench/real_shape.py's arithmetic: its config is the published model, and its adapter-size check counts as PEFT does."""

import torch

from bench import real_shape


def test_config_is_qwen25_1_5b_instruct():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config.from_dict(real_shape.QWEN25_1_5B_INSTRUCT)
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(config)
    total = model.num_parameters()  # the tied LM head counted once
    assert total == 1_543_714_304  # the model card: 1.54B parameters, 1.31B without the embedding
    assert total - config.vocab_size * config.hidden_size == 1_310_340_608
    assert config.rope_parameters["rope_theta"] == 1e6 and config.sliding_window is None
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_expected_lora_parameters_match_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    model = get_peft_model(
        Qwen2ForCausalLM(config), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (
        trainable == real_shape.expected_lora_parameters(config, 4) == 2 * 4 * (4 * 64 + 2 * (64 + 16) + 3 * (64 + 96))
    )
