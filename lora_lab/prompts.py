"""Prompt styles: how a user's text is wrapped before an instruction-tuned model sees it.

Each chat model was fine-tuned on one exact format (its "chat template"); text in any other format still
works, but noticeably worse. The same `apply(instruction, input)` builds the prompts of generation and of the
fine-tuning data, so a model fine-tuned with lora_lab is prompted at inference exactly as it was trained.

    style = PromptStyle.from_name("chatml")            # or PromptStyle.from_checkpoint(checkpoint_dir)
    text = style.apply("What is the capital of France?")
    stop_ids = tokenizer.eos_ids + style.stop_tokens(tokenizer)

BOS is never part of the text: the tokenizer adds it (`Tokenizer.encode(bos=None)`), so it is not doubled.

Some chat templates add a default system message when the conversation has none (SmolLM2-Instruct:
"You are a helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2.5-Instruct: "You are Qwen,
created by Alibaba Cloud. You are a helpful assistant."). `from_checkpoint` reads that default from the
checkpoint's chat template, so a single user turn renders exactly as `tokenizer.apply_chat_template` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

from lora_lab.utils import LoraLabError


class PromptStyle:
    """Base class. `apply` returns the text to tokenize; the model's answer follows it."""

    name = ""
    stop_token_names: tuple[str, ...] = ()  # tokens that end the model's turn, besides the tokenizer's EOS
    # the same format for other readers: the text that closes a finished assistant turn (multi-turn chats, the
    # server), a Jinja chat template (tokenizer.chat_template in GGUF files: llama.cpp --jinja, LM Studio) and
    # Ollama's Go template of one turn (.System, .Prompt) for a Modelfile's TEMPLATE. tests/test_prompts.py checks
    # that each renders exactly what `apply` does.
    turn_end = "\n\n"
    jinja: Optional[str] = None
    ollama = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"

    def __init__(self, default_system: Optional[str] = None) -> None:
        # used when apply(system=None); an explicit system (even "") replaces it
        self.default_system = default_system

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        raise NotImplementedError

    def stop_tokens(self, tokenizer) -> list[int]:
        """Ids of this style's end-of-turn tokens that exist in the tokenizer's vocabulary."""
        ids = []
        for token in self.stop_token_names:
            i = tokenizer.token_to_id(token)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    @classmethod
    def model_default_system(cls, checkpoint_dir: Union[str, Path]) -> Optional[str]:
        """The system message the model's own chat template adds when there is none (only ChatML models do)."""
        return None

    def _system(self, system: Optional[str]) -> Optional[str]:
        return self.default_system if system is None else system

    def __repr__(self) -> str:
        return f"PromptStyle.from_name({self.name!r}, default_system={self.default_system!r})"

    # ---- construction ---------------------------------------------------------------------------------------
    @staticmethod
    def from_name(name: str, checkpoint_dir: Union[str, Path, None] = None,
                  default_system: Optional[str] = None) -> "PromptStyle":
        """The style called `name`. With `checkpoint_dir`, its default system message is read from the
        checkpoint's chat template (a Hugging Face folder works too); `default_system` sets it directly."""
        if name not in prompt_styles:
            raise LoraLabError(f"Unknown prompt style {name!r}: choose one of {', '.join(prompt_styles)}")
        cls = prompt_styles[name]
        if default_system is None and checkpoint_dir is not None:
            default_system = cls.model_default_system(checkpoint_dir)
        return cls(default_system=default_system)

    @staticmethod
    def from_checkpoint(checkpoint_dir: Union[str, Path], name: Optional[str] = None) -> "PromptStyle":
        """The style the checkpoint's model expects (`Config.prompt_style`), or `name` to override it."""
        if name is None:
            from lora_lab.checkpoint import load_config

            name = load_config(checkpoint_dir).prompt_style
        return PromptStyle.from_name(name, checkpoint_dir=checkpoint_dir)


def _join(prompt: str, input: str) -> str:
    """Chat formats have one user message: an `input` (Alpaca's context field) goes after the instruction."""
    return f"{prompt}\n\n{input}" if input else prompt


class Plain(PromptStyle):
    """The text as it is: base models, and completion-style prompts."""

    name = "plain"

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = _join(prompt, input)
        return f"{system}\n\n{text}" if system else text


class Alpaca(PromptStyle):
    """Stanford Alpaca's instruction format; the opening sentence plays the part of a system message."""

    name = "alpaca"
    jinja = ("{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% else %}"
             "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes "
             "the request.\\n\\n' }}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
             "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
             "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}"
             "{% endfor %}")
    ollama = ("{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. Write a "
              "response that appropriately completes the request.{{ end }}\n\n### Instruction:\n{{ .Prompt }}"
              "\n\n### Response:\n")

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        if input:
            preamble = ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.")
            return (f"{preamble if system is None else system}\n\n"
                    f"### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n")
        preamble = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.")
        return f"{preamble if system is None else system}\n\n### Instruction:\n{prompt}\n\n### Response:\n"


class ChatML(PromptStyle):
    """<|im_start|>role ... <|im_end|> turns: SmolLM2-Instruct, Qwen2.5-Instruct."""

    name = "chatml"
    stop_token_names = ("<|im_end|>", "<|endoftext|>")
    turn_end = "<|im_end|>\n"
    jinja = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
             "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
             "{% endif %}")
    ollama = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n"
              "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n")

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
        return text + f"<|im_start|>user\n{_join(prompt, input)}<|im_end|>\n<|im_start|>assistant\n"

    @classmethod
    def model_default_system(cls, checkpoint_dir: Union[str, Path]) -> Optional[str]:
        return default_system_message(checkpoint_dir)


class Llama2Chat(PromptStyle):
    """Llama 2 chat: the system message sits inside the first [INST] block, between <<SYS>> markers."""

    name = "llama2-chat"
    stop_token_names = ("</s>",)
    turn_end = " </s>"
    jinja = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
             "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
             "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
    ollama = "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]"

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        sys_block = "" if system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n"
        return f"[INST] {sys_block}{_join(prompt, input)} [/INST]"


class Llama3(PromptStyle):
    """Llama 3 instruct: header-delimited turns, each closed by <|eot_id|>."""

    name = "llama3"
    stop_token_names = ("<|eot_id|>", "<|end_of_text|>")
    turn_end = "<|eot_id|>"
    jinja = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
             "+ message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
    ollama = ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
              "<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = "" if system is None else f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        return (text + f"<|start_header_id|>user<|end_header_id|>\n\n{_join(prompt, input)}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")


class Mistral(PromptStyle):
    """Mistral instruct: [INST] ... [/INST]; it has no system role, so a system message leads the user turn
    (as Mistral's own template does)."""

    name = "mistral"
    stop_token_names = ("</s>",)
    turn_end = "</s>"
    jinja = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
             "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
             "{% endif %}{% endfor %}")
    ollama = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]"

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = _join(prompt, input)
        return f"[INST] {system}\n\n{text} [/INST]" if system else f"[INST] {text} [/INST]"


class Gemma(PromptStyle):
    """Gemma instruct: <start_of_turn>user / model turns; no system role, so it leads the user turn."""

    name = "gemma"
    stop_token_names = ("<end_of_turn>", "<eos>")
    turn_end = "<end_of_turn>\n"
    jinja = ("{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
             "else 'user') + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
    ollama = ("<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
              "<start_of_turn>model\n")

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = _join(prompt, input)
        if system:
            text = f"{system}\n\n{text}"
        return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


class Zephyr(PromptStyle):
    """Zephyr format, used by TinyLlama-1.1B-Chat: <|role|> lines, each turn closed by </s>."""

    name = "zephyr"
    stop_token_names = ("</s>",)
    turn_end = "</s>\n"
    jinja = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token "
             "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    ollama = ("{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}<|user|>\n{{ .Prompt }}</s>\n"
              "<|assistant|>\n")

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = "" if system is None else f"<|system|>\n{system}</s>\n"
        return text + f"<|user|>\n{_join(prompt, input)}</s>\n<|assistant|>\n"


class Phi3(PromptStyle):
    """Phi-3 instruct: <|role|> lines, each turn closed by <|end|>."""

    name = "phi3"
    stop_token_names = ("<|end|>", "<|endoftext|>")
    turn_end = "<|end|>\n"
    jinja = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    ollama = ("{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}<|user|>\n{{ .Prompt }}<|end|>\n"
              "<|assistant|>\n")

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = "" if system is None else f"<|system|>\n{system}<|end|>\n"
        return text + f"<|user|>\n{_join(prompt, input)}<|end|>\n<|assistant|>\n"


class Phi4(PromptStyle):
    """Phi-4-mini instruct: Phi-3's turns without the newlines."""

    name = "phi4"
    stop_token_names = ("<|end|>", "<|endoftext|>")
    turn_end = "<|end|>"
    jinja = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    ollama = "{{ if .System }}<|system|>{{ .System }}<|end|>{{ end }}<|user|>{{ .Prompt }}<|end|><|assistant|>"

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = "" if system is None else f"<|system|>{system}<|end|>"
        return text + f"<|user|>{_join(prompt, input)}<|end|><|assistant|>"


class Tulu(PromptStyle):
    """Tulu 3 format, used by OLMo 2 Instruct: <|role|> lines, a turn ends with a newline (the answer with EOS)."""

    name = "tulu"
    stop_token_names = ("<|endoftext|>",)
    turn_end = "<|endoftext|>\n"
    jinja = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + "
             "message['content'] + eos_token + '\\n' }}{% else %}{{ '<|' + message['role'] + '|>\\n' + "
             "message['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|assistant|>\\n' }}{% endif %}")
    ollama = "{{ if .System }}<|system|>\n{{ .System }}\n{{ end }}<|user|>\n{{ .Prompt }}\n<|assistant|>\n"

    def apply(self, prompt: str, input: str = "", system: Optional[str] = None) -> str:
        system = self._system(system)
        text = "" if system is None else f"<|system|>\n{system}\n"
        return text + f"<|user|>\n{_join(prompt, input)}\n<|assistant|>\n"


prompt_styles: dict[str, type[PromptStyle]] = {
    cls.name: cls for cls in (Plain, Alpaca, ChatML, Llama2Chat, Llama3, Mistral, Gemma, Zephyr, Phi3, Phi4, Tulu)
}


# ------------------------------------------------------------------------------------------------------------
# Reading a checkpoint's chat template
# ------------------------------------------------------------------------------------------------------------
# Default system messages of ChatML models whose checkpoint lacks a chat template (matched on Config.name/hf_repo)
KNOWN_DEFAULT_SYSTEMS = {
    "SmolLM2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "Qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
}

# a string literal in the template that opens a system turn and closes it with fixed text: the default.
# The newline may be a real one (SmolLM2) or the escape "\n" (Qwen2.5); the text holds no quote or brace.
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<]+)<\|im_end\|>")


def chat_template(checkpoint_dir: Union[str, Path]) -> Optional[str]:
    """The Jinja chat template shipped with the checkpoint (tokenizer_config.json or chat_template.jinja)."""
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / "chat_template.jinja").is_file():
        return (checkpoint_dir / "chat_template.jinja").read_text()
    path = checkpoint_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except json.JSONDecodeError as e:
        raise LoraLabError(f"{path} is not valid JSON ({e}): download or convert the checkpoint again") from None
    if isinstance(template, list):  # several named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def default_system_message(checkpoint_dir: Union[str, Path]) -> Optional[str]:
    """The system message a ChatML model's chat template inserts when the conversation has none, if any."""
    template = chat_template(checkpoint_dir)
    if template is not None:
        match = _DEFAULT_SYSTEM_RE.search(template)
        return match.group(1).replace("\\n", "\n") if match else None
    config_path = Path(checkpoint_dir) / "model_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        names = f"{config.get('name', '')} {config.get('hf_repo', '')}"
        for family, system in KNOWN_DEFAULT_SYSTEMS.items():
            if family in names:
                return system
    return None


def prompt_style_from_chat_template(template: Optional[str]) -> str:
    """Guess our prompt style from a tokenizer's Jinja chat template by the markers it uses."""
    if not template:
        return "plain"
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "llama2-chat" if "<<SYS>>" in template else "mistral"
    if "<start_of_turn>" in template:
        return "gemma"
    # the newline after a role tag is a real one or the escape "\n", as in the ChatML default-system pattern
    if "<|end|>" in template:  # Phi-3 puts a newline after <|user|>, Phi-4-mini does not
        return "phi3" if re.search(r"<\|user\|>(?:\n|\\n)", template) else "phi4"
    if re.search(r"'<\|user\|>(?:\n|\\n)' \+ message\['content'\] \+ '(?:\n|\\n)'", template):
        return "tulu"  # OLMo 2: a user turn ends with a newline, not EOS
    if "<|user|>" in template:
        return "zephyr"
    return "plain"
