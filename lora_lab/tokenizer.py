"""Text <-> token ids, with the checkpoint's own tokenizer file and special tokens.

A checkpoint holds either `tokenizer.json` (the Hugging Face `tokenizers` format: BPE, WordPiece, ...) or
`tokenizer.model` (a SentencePiece model, as Llama 2 ships). BOS/EOS come from the checkpoint's
`tokenizer_config.json`, `generation_config.json` and `config.json`, in that order of preference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from lora_lab.utils import LoraLabError


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise LoraLabError(f"{path} is not valid JSON ({e}): download or convert the checkpoint again") from None


def _token_str(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, checkpoint_dir: Union[str, Path]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise LoraLabError(f"Tokenizer directory {checkpoint_dir} does not exist")
        if (checkpoint_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            self.processor = HFTokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
        elif (checkpoint_dir / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            self.backend = "sentencepiece"
            self.processor = SentencePieceProcessor(model_file=str(checkpoint_dir / "tokenizer.model"))
            self.vocab_size = self.processor.vocab_size()
        else:
            raise LoraLabError(f"{checkpoint_dir} has no tokenizer.json or tokenizer.model: copy the tokenizer file "
                               f"of the model into it")

        tok_config = _read_json(checkpoint_dir / "tokenizer_config.json")
        gen_config = _read_json(checkpoint_dir / "generation_config.json")
        hf_config = _read_json(checkpoint_dir / "config.json")

        self.bos_id = self._special_id(tok_config.get("bos_token"), gen_config, hf_config, "bos_token_id")
        eos_id = self._special_id(tok_config.get("eos_token"), gen_config, hf_config, "eos_token_id")
        self.eos_id = eos_id
        # generation may stop at several tokens (Llama 3: <|end_of_text|> and <|eot_id|>)
        eos_ids = [eos_id] if eos_id is not None else []
        for source in (gen_config, hf_config):
            value = source.get("eos_token_id")
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in eos_ids:
                    eos_ids.append(i)
        self.eos_ids = eos_ids
        # does encoding add BOS by default? Llama/Mistral/Gemma: yes; GPT-2-style BPE (SmolLM, Qwen): no
        if "add_bos_token" in tok_config:
            self.add_bos = bool(tok_config["add_bos_token"]) and self.bos_id is not None
        elif self.backend == "huggingface":
            # no explicit setting (Llama 3): the tokenizer.json post-processor decides, as in transformers
            ids = self.processor.encode("a", add_special_tokens=True).ids
            self.add_bos = self.bos_id is not None and bool(ids) and ids[0] == self.bos_id
        else:
            self.add_bos = self.bos_id is not None

    def _special_id(self, token, gen_config: dict, hf_config: dict, key: str) -> Optional[int]:
        token = _token_str(token)
        if token:
            i = self.token_to_id(token)
            if i is not None:
                return i
        for source in (gen_config, hf_config):
            value = source.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
        if self.backend == "sentencepiece":
            i = self.processor.bos_id() if key == "bos_token_id" else self.processor.eos_id()
            return i if i >= 0 else None
        return None

    def token_to_id(self, token: str) -> Optional[int]:
        if self.backend == "huggingface":
            return self.processor.token_to_id(token)
        i = self.processor.piece_to_id(token)
        return None if i == self.processor.unk_id() and token != self.processor.id_to_piece(i) else i

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False,
               max_length: Optional[int] = None) -> torch.Tensor:
        """Token ids (LongTensor of shape (T,)). bos=None adds BOS when the model's tokenizer does by default."""
        if self.backend == "huggingface":
            ids = self.processor.encode(text, add_special_tokens=False).ids
        else:
            ids = self.processor.encode(text)
        if (self.add_bos if bos is None else bos):
            if self.bos_id is None:
                raise LoraLabError("This tokenizer has no BOS token; encode with bos=False")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise LoraLabError("This tokenizer has no EOS token; encode with eos=False")
            ids = ids + [self.eos_id]
        if max_length is not None:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Union[torch.Tensor, Iterable[int]], skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.backend == "huggingface":
            return self.processor.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.processor.decode(ids)
