"""`python -m lora_lab.export_gguf`: the documented entry point, kept where users call it; the code is
lora_lab/formats/gguf_adapter.py (adapters) and lora_lab/formats/gguf_export.py (models)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("lora_lab.formats.gguf_adapter", run_name="__main__", alter_sys=True)
else:
    from lora_lab.formats.gguf_adapter import *  # noqa: F401,F403  (`from lora_lab.export_gguf import ...` keeps working)
    from lora_lab.formats.gguf_export import *  # noqa: F401,F403
