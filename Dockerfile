# The NeurIPS 2023 LLM Efficiency Challenge required each entry as a Docker image that serves the model over HTTP
# (POST /process, /tokenize, /decode on port 80) for HELM to score. This image is lora_lab's server with the
# challenge's API, the base checkpoint and your adapter baked in. See tutorials/efficiency_challenge.md.
#
#   docker build -t my-entry --build-arg BASE_DIR=checkpoints/mistralai/Mistral-7B-v0.1 \
#       --build-arg ADAPTER_DIR=out/challenge/qlora-4090 .
#   docker run --gpus all -p 8080:80 my-entry
#   curl -X POST localhost:8080/process -H 'Content-Type: application/json' -d '{"prompt": "The capital of France is"}'
#
# BASE_DIR and ADAPTER_DIR are paths inside the build context (this checkout): a lora_lab checkpoint
# (python -m lora_lab.download / convert) and the out_dir of finetune/lora.py or finetune/qlora.py. A QLoRA adapter
# is served on the 4-bit base it was trained on (its lora_config.json says so); add --quantize nf4 to CMD to put any
# adapter on an NF4 base. Nothing is downloaded when the container runs (HF_HUB_OFFLINE=1).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /submission
COPY pyproject.toml README.md ./
COPY lora_lab ./lora_lab
RUN pip install --no-cache-dir ".[serve]"

ARG BASE_DIR
ARG ADAPTER_DIR
COPY ${BASE_DIR} /submission/base
COPY ${ADAPTER_DIR} /submission/adapter

ENV HF_HUB_OFFLINE=1
EXPOSE 80
CMD ["python", "-m", "lora_lab.serve", "--checkpoint_dir", "/submission/base", \
     "--adapters", "entry=/submission/adapter", "--challenge_api", "--host", "0.0.0.0", "--port", "80"]
