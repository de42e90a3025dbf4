"""`python -m lora_lab.merge_lora`: the documented entry point, kept where users call it; the code is lora_lab/formats/merge.py."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("lora_lab.formats.merge", run_name="__main__", alter_sys=True)
else:
    from lora_lab.formats.merge import *  # noqa: F401,F403  (`from lora_lab.merge_lora import ...` keeps working)
