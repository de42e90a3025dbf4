"""Checkpoints in and out of lora_lab: every file format we read or write, and the Hub.

    hf.py           Hugging Face folders <-> our checkpoints (every family's name table)
    gguf_names.py   llama.cpp's tensor and architecture names, one table for import and export
    gguf_import.py  a .gguf file -> our checkpoint (dequantized, tokenizer rebuilt)
    gguf_export.py  our checkpoint -> a .gguf model; gguf_adapter.py: a LoRA adapter -> a .gguf adapter + Modelfile
    llama2c.py      llama2.c .bin files (and their tokenizer)
    sp_vocab.py     SentencePiece vocabularies built from a list of pieces (GGUF and llama2.c both need one)
    peft.py         our LoRA adapter -> a PEFT adapter folder
    merge.py        an adapter merged into its base, written as our checkpoint, Hugging Face or GGUF
    download.py     the Hub (and the offline default model), converted on arrival
    convert.py      `python -m lora_lab.convert`: picks the reader or writer by what SRC is

`python -m lora_lab.convert`, `lora_lab.download`, `lora_lab.merge_lora`, `lora_lab.export_peft` and
`lora_lab.export_gguf` stay the commands users type (small modules at the top level that run these).
The core (model, config, lora, nf4, adapter, tokenizer, prompts) never imports from here
(tests/test_import_graph.py)."""
