import json
import re

import pytest

from lora_lab.checkpoint import save_checkpoint
from lora_lab.config import Config
from lora_lab.prompts import KNOWN_DEFAULT_SYSTEMS, PromptStyle, default_system_message, prompt_styles
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError

SMOL = "models/smollm2-135m-instruct"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# the non-tool part of Qwen2.5-Instruct's chat template (the "\n" are escapes inside Jinja string literals)
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)


def test_registry_and_unknown_name():
    assert set(prompt_styles) == {"plain", "alpaca", "chatml", "llama2-chat", "llama3", "mistral", "gemma", "zephyr",
                                  "phi3", "phi4", "tulu"}
    for name in prompt_styles:
        assert PromptStyle.from_name(name).name == name
    with pytest.raises(LoraLabError, match="Unknown prompt style 'chat-ml'.*chatml.*zephyr"):
        PromptStyle.from_name("chat-ml")


def test_plain_is_untouched():
    style = PromptStyle.from_name("plain")
    assert style.apply("Once upon a time") == "Once upon a time"
    assert style.apply(" leading space\n") == " leading space\n"
    assert style.apply("Translate:", input="bonjour") == "Translate:\n\nbonjour"


def test_alpaca_exact():
    style = PromptStyle.from_name("alpaca")
    assert style.apply("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\n")
    assert style.apply("Translate to French.", input="cat") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:\n")


def test_chat_styles_exact():
    p = "Hi"
    assert PromptStyle.from_name("chatml").apply(p) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert PromptStyle.from_name("chatml").apply(p, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert PromptStyle.from_name("llama2-chat").apply(p) == "[INST] Hi [/INST]"
    assert PromptStyle.from_name("llama2-chat").apply(p, system="Be brief.") == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
    assert PromptStyle.from_name("llama3").apply(p) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert PromptStyle.from_name("llama3").apply(p, system="Be brief.") == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert PromptStyle.from_name("mistral").apply(p) == "[INST] Hi [/INST]"
    assert PromptStyle.from_name("mistral").apply(p, system="Be brief.") == "[INST] Be brief.\n\nHi [/INST]"
    assert PromptStyle.from_name("gemma").apply(p) == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert PromptStyle.from_name("gemma").apply(p, system="Be brief.") == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert PromptStyle.from_name("zephyr").apply(p) == "<|user|>\nHi</s>\n<|assistant|>\n"
    assert PromptStyle.from_name("zephyr").apply(p, system="Be brief.") == (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n")
    assert PromptStyle.from_name("phi3").apply(p, system="Be brief.") == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n")
    assert PromptStyle.from_name("phi4").apply(p, system="Be brief.") == (
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>")
    assert PromptStyle.from_name("tulu").apply(p, system="Be brief.") == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n")
    # an input joins the instruction in the one user message
    assert PromptStyle.from_name("chatml").apply("Translate.", input="cat") == (
        "<|im_start|>user\nTranslate.\n\ncat<|im_end|>\n<|im_start|>assistant\n")
    # no style puts BOS in the text: the tokenizer adds it
    for name, cls in prompt_styles.items():
        text = cls().apply("x")
        assert "<s>" not in text and "<|begin_of_text|>" not in text and "<bos>" not in text, name


@pytest.fixture(scope="module")
def smol_hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from conftest import require_asset

    return transformers.AutoTokenizer.from_pretrained(str(require_asset(SMOL)))


@pytest.mark.parametrize("system", [None, "You are a pirate.", ""])
def test_chatml_matches_smollm2_chat_template(assets, smol_hf_tokenizer, system):
    smol_dir = assets(SMOL)
    style = PromptStyle.from_name("chatml", checkpoint_dir=smol_dir)
    assert style.default_system == SMOL_SYSTEM
    prompt = "What is the capital of France?"
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    expected = smol_hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert style.apply(prompt, system=system) == expected
    # and the token ids our tokenizer makes of it are those of transformers' tokenizer
    expected_ids = smol_hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys"):
        expected_ids = expected_ids["input_ids"]
    assert Tokenizer(smol_dir).encode(style.apply(prompt, system=system)).tolist() == list(expected_ids)


def test_chatml_without_template_has_no_default_system():
    assert PromptStyle.from_name("chatml").default_system is None


def test_qwen_default_system_from_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))
    assert default_system_message(tmp_path) == QWEN_SYSTEM
    style = PromptStyle.from_name("chatml", checkpoint_dir=tmp_path)
    assert style.apply("Hi") == (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
                                 "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # rendered with Jinja as transformers does, the template gives the same text
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(QWEN_TEMPLATE).render(messages=[{"role": "user", "content": "Hi"}],
                                                     add_generation_prompt=True)
    assert style.apply("Hi") == rendered
    # a chat_template.jinja file (newer transformers) is read too
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    assert default_system_message(tmp_path) == QWEN_SYSTEM


def test_from_checkpoint_uses_config_style_and_known_defaults(tmp_path):
    import torch

    config = Config(name="Qwen2.5-0.5B-Instruct", n_layer=1, n_embd=8, n_head=2, vocab_size=16,
                    prompt_style="chatml")
    save_checkpoint(tmp_path, config, {"w": torch.zeros(1)})
    style = PromptStyle.from_checkpoint(tmp_path)  # no template in the folder: the known default applies
    assert style.name == "chatml"
    assert style.default_system == KNOWN_DEFAULT_SYSTEMS["Qwen2.5"] == QWEN_SYSTEM
    assert PromptStyle.from_checkpoint(tmp_path, name="plain").apply("Hi") == "Hi"
    config.name = "my-model"
    save_checkpoint(tmp_path, config, {"w": torch.zeros(1)})
    assert PromptStyle.from_checkpoint(tmp_path).default_system is None


def test_stop_tokens(assets):
    smol = Tokenizer(assets(SMOL))
    assert PromptStyle.from_name("chatml").stop_tokens(smol) == [2, 0]  # <|im_end|>, <|endoftext|>
    assert PromptStyle.from_name("plain").stop_tokens(smol) == []
    assert PromptStyle.from_name("llama3").stop_tokens(smol) == []  # not in this vocabulary
    llama2 = Tokenizer(assets("tokenizers/llama2"))  # SentencePiece tokenizer.model
    assert PromptStyle.from_name("llama2-chat").stop_tokens(llama2) == [2]  # </s>
    assert PromptStyle.from_name("chatml").stop_tokens(llama2) == []


@pytest.mark.parametrize("name", ["phi3", "phi4", "tulu"])
def test_new_styles_jinja_and_ollama_render_apply(name):
    """The chat template (as transformers renders it) and the Ollama template give exactly `apply`'s text."""
    jinja2 = pytest.importorskip("jinja2")
    style = PromptStyle.from_name(name)
    for system in (None, "Be brief."):
        messages = ([] if system is None else [{"role": "system", "content": system}]) + [
            {"role": "user", "content": "Hi"}]
        rendered = jinja2.Environment().from_string(style.jinja).render(
            messages=messages, add_generation_prompt=True, eos_token="<|endoftext|>")
        assert rendered == style.apply("Hi", system=system)
        ollama = style.ollama.replace("{{ .Prompt }}", "Hi")
        if system is None:
            ollama = re.sub(r"\{\{ if \.System \}\}.*?\{\{ end \}\}", "", ollama, flags=re.S)
        else:
            ollama = ollama.replace("{{ if .System }}", "").replace("{{ end }}", "").replace("{{ .System }}", system)
        assert ollama == style.apply("Hi", system=system)
