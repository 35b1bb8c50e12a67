"""engine.tiny checkpoints: deterministic, loadable by transformers, and with the K-EXAONE tokens and template."""
import json

import pytest
import torch
from safetensors import safe_open

from exaserve.engine.tiny import EOS_ID, LOW_TOKENS, TAGS, make_tiny_checkpoint
from exaserve.engine.tokenizer import Tokenizer

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja"]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOLS_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "Current weather", '
              '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def test_same_seed_same_bytes_other_seed_other_weights(ckpt, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "a")
    for name in FILES:
        assert (again / name).read_bytes() == (ckpt / name).read_bytes(), name
    other = make_tiny_checkpoint(tmp_path / "b", seed=1)
    assert (other / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()
    # every file gets the same mode (safetensors alone would make the weights owner-only)
    assert len({(again / name).stat().st_mode for name in FILES}) == 1


def test_config_and_tensor_layout(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    assert cfg["mlp_layer_types"] == ["dense", "sparse", "sparse", "sparse"]
    assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] >= Tokenizer.from_pretrained(ckpt).vocab_size
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.e_score_correction_bias").abs().min() > 0
        assert f.get_tensor("mtp.fc.weight").shape == (64, 128)
        assert f.get_tensor("mtp.layers.0.mlp.down_proj.weight").shape == (64, 128)
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in keys


def test_overrides_and_bf16_without_mtp(tmp_path):
    path = make_tiny_checkpoint(tmp_path, dtype="bfloat16", with_mtp=False, num_hidden_layers=2, sliding_window=4)
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["sliding_window"], cfg["num_nextn_predict_layers"]) == (2, 4, 0)
    assert cfg["layer_types"] == ["sliding_attention"] * 2
    with safe_open(path / "model.safetensors", "pt") as f:
        assert not any(k.startswith("mtp.") for k in f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_checkpoint(tmp_path / "small", vocab_size=64)


def test_transformers_loads_every_weight_and_logits_are_not_flat(ckpt):
    from transformers import ExaoneMoeForCausalLM

    model, info = ExaoneMoeForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 200, 300, 400, 500, 600]])).logits[0]
    assert logits.std(-1).min() > 0.5
    assert len(set(logits.argmax(-1).tolist())) > 1


def test_special_token_ids(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, EOS_ID)
    assert tok.id_to_token(EOS_ID) == "<|endofturn|>" and tok.token_to_id("<|pad|>") == 0
    assert tok.added_tokens == {t: i for i, t in enumerate(LOW_TOKENS)}
    assert tok.special_ids == {i for i, t in enumerate(LOW_TOKENS) if t not in TAGS}
    assert tok.chat_template == (ckpt / "chat_template.jinja").read_text()


TEXTS = ["Hello, world! The weather in Seoul is sunny.", "오늘은 날씨가 맑습니다.", '{"city": "Paris"}',
         "<|user|>\nhi<|endofturn|>\n<|assistant|>\n<think>\nhmm\n</think>\n\n<tool_call>{}</tool_call><|endofturn|>",
         "  spaces\tand\nnewlines  "]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_agrees_with_transformers(ckpt, hf_tok, text):
    tok = Tokenizer.from_pretrained(ckpt)
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True) == [1] + ids
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_skip_special_tokens_keeps_tags(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    ids = tok.encode("<|assistant|>\n<think>\nx\n</think>\n\nok<|endofturn|>")
    assert tok.decode(ids) == "\n<think>\nx\n</think>\n\nok"


def test_template_thinking_on_and_off(hf_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    head = "<|system|>\nBe brief.<|endofturn|>\n<|user|>\nHi<|endofturn|>\n"
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        head + "<|assistant|>\n<think>\n")
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        head + "<|assistant|>\n<think>\n\n</think>\n\n")


def test_template_tools_calls_and_results(hf_tok):
    msgs = [
        {"role": "user", "content": "Weather in Paris and Seoul?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two cities.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}}]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "21C"},
        {"role": "assistant", "content": "Paris 18C, Seoul 21C."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]
    assert hf_tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True) == (
        f"<|tool_declare|>\n# Tools\n<tool>{TOOLS_JSON}</tool>\n<|endofturn|>\n"
        "<|user|>\nWeather in Paris and Seoul?<|endofturn|>\n"
        "<|assistant|>\n<think>\nTwo cities.\n</think>\n\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Seoul"}}</tool_call><|endofturn|>\n'
        "<|tool|>\n<tool_result>18C</tool_result>\n<tool_result>21C</tool_result><|endofturn|>\n"
        "<|assistant|>\n<think>\n\n</think>\n\nParis 18C, Seoul 21C.<|endofturn|>\n"
        "<|user|>\nThanks<|endofturn|>\n<|assistant|>\n<think>\n"
    )


def test_template_rejects_unknown_role(hf_tok):
    with pytest.raises(Exception, match="Unknown message role: robot"):
        hf_tok.apply_chat_template([{"role": "robot", "content": "beep"}], tokenize=False)


def test_tokenizer_reads_hf_style_dir_without_bos_settings(ckpt, tmp_path):
    """Like many released checkpoints: template inside tokenizer_config.json, no add_bos_token, no post-processor."""
    from transformers import AutoTokenizer

    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    del config["add_bos_token"], config["add_eos_token"]
    config["chat_template"] = (ckpt / "chat_template.jinja").read_text()
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert tok.encode(TEXTS[3], add_special_tokens=True) == hf.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert tok.chat_template == config["chat_template"] and tok.eos_token_id == EOS_ID
