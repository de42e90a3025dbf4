"""Evaluation: did fine-tuning improve the task, and what did the model forget?

    python -m lora_lab.evaluate --checkpoint_dir DIR [--adapter_dir ADAPTER] --tasks arc_easy,mmlu,perplexity,json

  load.py           the model to score: a base, + a LoRA / QLoRA / LLaMA-Adapter / full fine-tune, NF4
  lm_eval_model.py  our GPT as an lm-evaluation-harness model (batched loglikelihood, rolling, generate_until)
  local_tasks.py    lm-eval's task definitions on local copies of their data sets (tasks/local_data.yaml)
  perplexity.py     sliding-window perplexity of text; of the answers on instruction data
  json_task.py      greedy answers scored as JSON (lora_lab/json_score.py): valid, keys, values, schema
  compare.py        several models side by side, with the differences
  __main__.py       the command line

Nothing here is imported by `import lora_lab.evaluate`; lm-eval is imported only by the lm-eval path
(lm_eval_model.py, local_tasks.py), so perplexity and JSON evaluation work without it.
"""
