"""Fine-tuning data: instruction rows (instructions.py), their tokens, batches and order (sft.py), the
built-in offline JSON-extraction task (json_extraction.py), several samples per row for --packing (packing.py),
and raw text for continued pre-training (text.py)."""

from lora_lab.data.instructions import (NAMED_DATASETS, InstructionData, load_instructions, read_instruction_file,
                                        split_rows)
from lora_lab.data.packing import PackedDataset, pack_indices
from lora_lab.data.sft import (IGNORE_INDEX, LengthBucketSampler, SFTDataset, ShuffledBatchSampler, collate,
                               get_dataloaders, padding_fraction, tokenize_sample)

__all__ = ["NAMED_DATASETS", "InstructionData", "load_instructions", "read_instruction_file", "split_rows",
           "PackedDataset", "pack_indices", "IGNORE_INDEX", "LengthBucketSampler", "SFTDataset",
           "ShuffledBatchSampler", "collate", "get_dataloaders", "padding_fraction", "tokenize_sample"]
