"""Fine-tuning data, one module per kind:

    instructions.py     instruction rows (built-in names, .json / .jsonl / .csv files), their columns and splits
    sft.py              instruction rows -> tokens with prompt masking; get_dataloaders (every finetune script)
    batches.py          padding (collate), length buckets and shuffled batch order
    packing.py          several samples per row for --packing
    text.py             raw text for continued pre-training (--data FILE.txt or a folder)
    json_extraction.py  the built-in offline task (reviews -> JSON) and its scorer
    classification.py   labelled texts for finetune/classify.py
    preference.py       chosen / rejected pairs for finetune/dpo.py
"""

from lora_lab.data.instructions import (NAMED_DATASETS, InstructionData, load_instructions, read_instruction_file,
                                        split_rows)
from lora_lab.data.packing import PackedDataset, pack_indices
from lora_lab.data.sft import (IGNORE_INDEX, LengthBucketSampler, SFTDataset, ShuffledBatchSampler, collate,
                               get_dataloaders, padding_fraction, tokenize_sample)

__all__ = ["NAMED_DATASETS", "InstructionData", "load_instructions", "read_instruction_file", "split_rows",
           "PackedDataset", "pack_indices", "IGNORE_INDEX", "LengthBucketSampler", "SFTDataset",
           "ShuffledBatchSampler", "collate", "get_dataloaders", "padding_fraction", "tokenize_sample"]
