"""Hugging Face <-> lora_lab conversion: logits parity with transformers for every supported family, both
directions, every weight file layout, and one-line errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_tiny import SEQ, TINY_HF, VOCAB, tiny_hf_config, tiny_hf_model  # noqa: E402
from lora_lab.checkpoint import save_checkpoint  # noqa: E402
from lora_lab.config import Config  # noqa: E402
from lora_lab.formats.hf import (  # noqa: E402
    FAMILIES,
    config_from_hf,
    convert_hf_checkpoint,
    export_hf,
    export_hf_state_dict,
    fuse_qkv,
    prompt_style_from_chat_template,
    split_qkv,
)
from lora_lab.model import GPT  # noqa: E402
from lora_lab.utils import LoraLabError  # noqa: E402


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ))  # (B, T)


@torch.no_grad()
def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    return model(idx).logits.float()


@torch.no_grad()
def our_logits(checkpoint_dir, idx: torch.Tensor) -> torch.Tensor:
    return GPT.from_checkpoint(checkpoint_dir).eval()(idx).float()


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def load_hf(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32,
                                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# ---- Hugging Face -> lora_lab --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY_HF))
def test_hf_to_lora_lab_logits_and_back(tmp_path, name):
    hf_model = tiny_hf_model(name)
    hf_model.save_pretrained(tmp_path / "hf")
    config = convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")

    assert config.extra["hf_architecture"] == hf_model.config.architectures[0]
    assert (tmp_path / "ours" / "generation_config.json").is_file()  # save_pretrained wrote one: copied
    idx = batch()
    torch.testing.assert_close(our_logits(tmp_path / "ours", idx), hf_logits(hf_model, idx))

    # and back: the exported tensors are the original ones, bit for bit, under the same names (those of the
    # files: transformers 5 stacks MoE experts in memory only)
    export_hf(tmp_path / "ours", tmp_path / "back")
    expected = load_file(str(tmp_path / "hf" / "model.safetensors"))
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    assert (tmp_path / "back" / "generation_config.json").is_file()


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_model.bin", "sharded_bin"])
def test_weight_file_layouts(tmp_path, layout):
    hf_model = tiny_hf_model("llama32_tied")
    hf_dir = tmp_path / "hf"
    if layout == "sharded_safetensors":
        hf_model.save_pretrained(hf_dir, max_shard_size="40KB")
        assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    else:
        hf_model.config.save_pretrained(hf_dir)
        state_dict = hf_model.state_dict()  # includes the tied lm_head.weight, as old .bin files do
        if layout == "pytorch_model.bin":
            torch.save(state_dict, hf_dir / "pytorch_model.bin")
        else:
            keys = list(state_dict)
            shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                      "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
            for file, names in shards.items():
                torch.save({k: state_dict[k] for k in names}, hf_dir / file)
            weight_map = {k: file for file, names in shards.items() for k in names}
            (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert_hf_checkpoint(hf_dir, tmp_path / "ours")
    idx = batch()
    torch.testing.assert_close(our_logits(tmp_path / "ours", idx), hf_logits(hf_model, idx))


def test_sliding_window_and_rope_scaling_matter(tmp_path):
    """The parity tests above would catch a dropped window or rope scaling: the outputs really differ."""
    idx = batch()
    for name, field, off in [("mistral", "sliding_window", None), ("llama3", "rope_scaling", None)]:
        hf_model = tiny_hf_model(name)
        hf_model.save_pretrained(tmp_path / name)
        config = convert_hf_checkpoint(tmp_path / name, tmp_path / f"{name}_ours")
        assert getattr(config, field) is not None
        model = GPT.from_checkpoint(tmp_path / f"{name}_ours").eval()
        setattr(model.config, field, off)
        changed = GPT(model.config).eval()
        changed.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert not torch.allclose(changed(idx), hf_logits(hf_model, idx), atol=1e-3), name


def test_convert_dtype_and_tokenizer_files(tmp_path):
    hf_model = tiny_hf_model("qwen2")
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "x"}))
    (hf_dir / "chat_template.jinja").write_text(template)
    config = convert_hf_checkpoint(hf_dir, tmp_path / "ours", dtype="bfloat16")
    assert config.prompt_style == "chatml"
    assert json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())["chat_template"] == template
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == template
    weights = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    torch.testing.assert_close(weights["blocks.0.attn.q_proj.bias"],
                               hf_model.model.layers[0].self_attn.q_proj.bias.detach().bfloat16(), rtol=0, atol=0)

    hf_config = export_hf(tmp_path / "ours", tmp_path / "back", dtype=torch.float16)
    assert hf_config["dtype"] == "float16" and hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert {v.dtype for v in load_file(str(tmp_path / "back" / "model.safetensors")).values()} == {torch.float16}
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (hf_dir / name).read_bytes(), name


# ---- lora_lab -> Hugging Face --------------------------------------------------------------------------------
def random_gpt(config: Config) -> GPT:
    torch.manual_seed(1)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases away from 1 / 0, so a misplaced one shows in the logits
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("keep_architecture", [True, False], ids=["from_hf", "inferred"])
@pytest.mark.parametrize("name", list(TINY_HF))
def test_lora_lab_to_hf_logits(tmp_path, name, keep_architecture):
    hf_config = tiny_hf_config(name)
    config = config_from_hf(hf_config.to_dict())
    architecture = config.extra["hf_architecture"]
    if not keep_architecture:  # e.g. a model imported from GGUF or llama2.c: export picks the architecture
        config.extra = {}
    model = random_gpt(config)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    save_checkpoint(tmp_path / "ours", config, model.state_dict(), tokenizer_dir=tok_dir)

    written = export_hf(tmp_path / "ours", tmp_path / "hf")
    # inferred, a config goes to the first family that expresses it: Phi-3's (sliding window, SwiGLU) is Mistral's
    inferred = {"phi3": "MistralForCausalLM"}
    assert written["architectures"] == [architecture if keep_architecture else inferred.get(name, architecture)]
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == written
    generation_config = (tmp_path / "hf" / "generation_config.json").read_bytes()
    assert generation_config == (tok_dir / "generation_config.json").read_bytes()
    hf_model = load_hf(tmp_path / "hf")
    idx = batch()
    with torch.no_grad():
        expected = model(idx)
    torch.testing.assert_close(hf_logits(hf_model, idx), expected)


def test_export_keeps_token_ids_and_reconverts_to_the_same_config(tmp_path):
    hf_model = tiny_hf_model("falcon40b")
    hf_model.config.bos_token_id, hf_model.config.eos_token_id = 5, [6, 7]
    hf_model.save_pretrained(tmp_path / "hf")
    config = convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    written = export_hf(tmp_path / "ours", tmp_path / "back")
    assert written["bos_token_id"] == 5 and written["eos_token_id"] == [6, 7]
    assert written["new_decoder_architecture"] is True and written["num_kv_heads"] == 2
    again = convert_hf_checkpoint(tmp_path / "back", tmp_path / "ours2")
    assert again.to_dict() == {**config.to_dict(), "name": "back"}


def test_export_error_when_no_architecture_fits(tmp_path):
    config = Config(name="odd", vocab_size=VOCAB, n_layer=1, n_embd=32, n_head=4, norm_class="RMSNorm",
                    mlp_class="gelu", block_size=32)  # RMSNorm with a plain GELU MLP: no HF class has that
    save_checkpoint(tmp_path / "ours", config, random_gpt(config).state_dict())
    with pytest.raises(LoraLabError, match="no Hugging Face architecture can express") as e:
        export_hf(tmp_path / "ours", tmp_path / "hf")
    assert str(tmp_path / "ours") in one_line_error(e)
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_export_error_when_config_no_longer_fits_its_architecture():
    config = config_from_hf(tiny_hf_config("llama2").to_dict())
    config.norm_class = "LayerNorm"
    with pytest.raises(LoraLabError, match="no longer fits LlamaForCausalLM"):
        export_hf_state_dict(config, random_gpt(config).state_dict())


def test_export_state_dict_rejects_unmerged_lora_weights():
    config = config_from_hf(tiny_hf_config("llama2").to_dict())
    state_dict = random_gpt(config).state_dict()
    state_dict["blocks.0.attn.q_proj.lora_A"] = torch.zeros(4, 64)
    with pytest.raises(LoraLabError, match=r"unexpected \['blocks.0.attn.q_proj.lora_A'\]"):
        export_hf_state_dict(config, state_dict)


def test_fused_qkv_layout():
    # 4 query heads in 2 groups, head size 1: rows are [q0, q1, k0, v0, q2, q3, k1, v1]
    config = Config(n_embd=4, n_head=4, n_query_groups=2, head_size=1)
    fused = torch.arange(8.0)
    parts = split_qkv(fused, config)
    assert parts["q"].tolist() == [0, 1, 4, 5] and parts["k"].tolist() == [2, 6] and parts["v"].tolist() == [3, 7]
    assert torch.equal(fuse_qkv(parts["q"], parts["k"], parts["v"], config), fused)


# ---- config.json -> Config -----------------------------------------------------------------------------------
def test_legacy_rope_keys_read_like_rope_parameters():
    new = tiny_hf_config("llama3").to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    params = new["rope_parameters"]
    old["rope_theta"] = params["rope_theta"]
    old["rope_scaling"] = {"rope_type": "llama3", **{k: params[k] for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    assert config_from_hf(old) == config_from_hf(new)
    config = config_from_hf(new)
    assert config.rope_base == 500000.0
    assert config.rope_scaling == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=32)
    # GPT-NeoX's own old names
    neox = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rotary_pct": 0.5, "rotary_emb_base": 1000}
    config = config_from_hf(neox)
    assert (config.rotary_percentage, config.rope_base, config.intermediate_size) == (0.5, 1000.0, 24576)
    assert config.bias and config.parallel_residual and not config.tie_embeddings


def test_config_flags_per_family():
    c = {n: config_from_hf(tiny_hf_config(n).to_dict()) for n in TINY_HF}
    assert (c["gemma"].head_size, c["gemma"].n_query_groups, c["gemma"].mlp_class, c["gemma"].gelu_approximate) == \
        (32, 1, "geglu", "tanh")
    assert c["gemma"].norm_unit_offset and c["gemma"].scale_embeddings and c["gemma"].tie_embeddings
    assert c["qwen2"].attn_qkv_bias and not c["qwen2"].bias and c["qwen2"].rope_base == 1e6
    assert c["mistral"].sliding_window == 6 and c["llama2"].sliding_window is None
    assert (c["falcon7b"].n_query_groups, c["falcon7b"].shared_attention_norm) == (1, True)
    assert (c["falcon40b"].n_query_groups, c["falcon40b"].shared_attention_norm) == (2, False)
    assert c["falcon_mha"].n_query_groups == 4 and c["falcon_mha"].bias
    assert (c["phi"].rope_n_elem, c["phi"].gelu_approximate, c["phi"].lm_head_bias) == (6, "tanh", True)
    assert (c["pythia"].rope_n_elem, c["pythia"].gelu_approximate) == (4, "none")
    assert c["stablelm"].norm_class == "LayerNorm" and c["stablelm"].attn_qkv_bias and not c["stablelm"].bias
    assert c["llama32_tied"].tie_embeddings and c["llama2"].norm_eps == 1e-5
    # Gemma's legacy hidden_act "gelu" means the tanh approximation (as transformers reads it)
    gemma = {**tiny_hf_config("gemma").to_dict(), "hidden_act": "gelu"}
    assert config_from_hf(gemma).gelu_approximate == "tanh"


def test_real_smollm2_config_matches_named_config(assets):
    folder = assets("models/smollm2-135m-instruct")
    from lora_lab.formats.hf import load_hf_config

    config = load_hf_config(folder)
    named = Config.from_name("SmolLM2-135M-Instruct")
    for field in ("vocab_size", "n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size",
                  "rope_base", "tie_embeddings", "norm_class", "mlp_class", "block_size", "prompt_style"):
        assert getattr(config, field) == getattr(named, field), field
    assert config.norm_eps == pytest.approx(named.norm_eps, rel=1e-6)  # the file says 9.999999747378752e-06
    assert config.extra["hf_architecture"] == "LlamaForCausalLM"


@pytest.mark.parametrize("template, style", [
    ("{{'<|im_start|>' + message['role']}}", "chatml"),
    ("<|start_header_id|>{{ role }}<|end_header_id|>", "llama3"),
    ("[INST] <<SYS>>\n{{ system }}\n<</SYS>>", "llama2-chat"),
    ("{{ bos_token }}[INST] {{ m }} [/INST]", "mistral"),
    ("<start_of_turn>user\n{{ m }}<end_of_turn>", "gemma"),
    ("<|user|>\n{{ m }}</s>", "zephyr"),
    ("{{'<|user|>' + '\\n' + message['content'] + '<|end|>'}}{{ '<|user|>\\n' }}", "phi3"),
    ("{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{{ '<|assistant|>' }}", "phi4"),
    ("{{ '<|user|>\\n' + message['content'] + '\\n' }}{{ '<|assistant|>\\n' }}", "tulu"),
    ("{{ m }}", "plain"),
    (None, "plain"),
])
def test_prompt_style_from_chat_template(template, style):
    assert prompt_style_from_chat_template(template) == style


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    tiny_hf_model("llama2").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_error_truncated_safetensors(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LoraLabError, match="truncated or corrupt") as e:
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert str(path) in one_line_error(e)


def test_error_corrupt_pytorch_bin(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(LoraLabError, match="truncated or corrupt") as e:
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert "pytorch_model.bin" in one_line_error(e)


def test_error_config_does_not_fit_weights(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["hidden_size"], config["head_dim"] = 32, 8
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoraLabError, match="does not fit the weights") as e:
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    msg = one_line_error(e)
    assert str(hf_dir / "config.json") in msg and "has shape (128, 64) but config.json implies (128, 32)" in msg


def test_error_unconsumed_and_missing_tensors(hf_dir, tmp_path):
    weights = load_file(str(hf_dir / "model.safetensors"))
    save_file({**weights, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, str(hf_dir / "model.safetensors"))
    with pytest.raises(LoraLabError, match="model.layers.0.mlp.extra.weight") as e:
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert "model.safetensors" in one_line_error(e)

    del weights["lm_head.weight"]  # config.json says untied
    save_file(weights, str(hf_dir / "model.safetensors"))
    with pytest.raises(LoraLabError, match="lack 1 tensors .*lm_head.weight") as e:
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert str(hf_dir) in one_line_error(e)


def test_error_missing_shard(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoraLabError, match="model-00002-of-00002.safetensors") as e:
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    one_line_error(e)


def test_error_missing_dir_config_and_weights(tmp_path):
    with pytest.raises(LoraLabError, match="does not exist") as e:
        convert_hf_checkpoint(tmp_path / "nope", tmp_path / "out")
    assert str(tmp_path / "nope") in one_line_error(e)

    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraLabError, match="no config.json") as e:
        convert_hf_checkpoint(tmp_path / "empty", tmp_path / "out")
    one_line_error(e)

    tiny_hf_config("llama2").save_pretrained(tmp_path / "no_weights")
    with pytest.raises(LoraLabError, match="has no weights: expected model.safetensors") as e:
        convert_hf_checkpoint(tmp_path / "no_weights", tmp_path / "out")
    assert str(tmp_path / "no_weights") in one_line_error(e)


def test_error_unsupported_architecture(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"],
                                                                 "model_type": "bert"}))
    with pytest.raises(LoraLabError, match="'BertForMaskedLM' is not supported") as e:
        convert_hf_checkpoint(tmp_path / "bert", tmp_path / "out")
    msg = one_line_error(e)
    assert str(tmp_path / "bert" / "config.json") in msg
    assert all(arch in msg for arch in FAMILIES)


def test_error_unsupported_features():
    falcon = {**tiny_hf_config("falcon7b").to_dict(), "alibi": True}
    with pytest.raises(LoraLabError, match="ALiBi"):
        config_from_hf(falcon)
    llama = {**tiny_hf_config("llama2").to_dict(), "rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}
    with pytest.raises(LoraLabError, match="rope type .dynamic. is not supported"):
        config_from_hf(llama)
    llama = {**tiny_hf_config("llama2").to_dict(), "attention_bias": True, "mlp_bias": False}
    with pytest.raises(LoraLabError, match="bias on the attention output"):
        config_from_hf(llama)


def test_convert_in_place(hf_dir):
    """lora_lab.download converts in the download folder: our model.safetensors replaces the source one."""
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    convert_hf_checkpoint(hf_dir, hf_dir)
    assert "wte.weight" in load_file(str(hf_dir / "model.safetensors"))
    idx = batch()
    torch.testing.assert_close(our_logits(hf_dir, idx), hf_logits(hf_model.eval(), idx))
