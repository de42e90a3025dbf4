"""`python -m lora_lab.export_peft`: the documented entry point, kept where users call it; the code is lora_lab/formats/peft.py."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("lora_lab.formats.peft", run_name="__main__", alter_sys=True)
else:
    from lora_lab.formats.peft import *  # noqa: F401,F403  (`from lora_lab.export_peft import ...` keeps working)
