"""`python -m lora_lab.convert`: the documented entry point, kept where users call it; the code is lora_lab/formats/convert.py."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("lora_lab.formats.convert", run_name="__main__", alter_sys=True)
else:
    from lora_lab.formats.convert import *  # noqa: F401,F403  (`from lora_lab.convert import ...` keeps working)
