# torchdist tasks. `just --list` shows them.

python := if path_exists(".venv/bin/python") == "true" { ".venv/bin/python" } else { "python" }

# List the tasks (what `just` alone does).
default:
    @{{just_executable()}} --justfile {{justfile()}} --list

# Open the notebooks in JupyterLab (`.[dev]` installs it).
notebook:
    {{python}} -m jupyterlab notebooks/

# Draw a MetricsLogger run's curves, e.g. `just plot runs/train_gpt/metrics.jsonl`.
plot jsonl="runs/train_gpt/metrics.jsonl":
    {{python}} -m torchdist.cli plot {{jsonl}}

# Run the test suite (what CI runs).
test *args:
    {{python}} -m pytest -n 2 -q -p no:cacheprovider {{args}}

# Train a small byte-level GPT on 2 CPU ranks, with progress output.
demo steps="300":
    {{python}} -m torch.distributed.run --standalone --nproc-per-node 2 examples/train_gpt.py --steps {{steps}}

# Benchmarks: ours vs hand-written torch, interleaved; prints medians and ratios.
bench:
    {{python}} benchmarks/import_time.py
    {{python}} benchmarks/step_overhead.py

# torchdist beside raw torch, Accelerate, Fabric and DeepSpeed on 2 CPU ranks (needs `.[bench]`).
bench-peers *args:
    {{python}} -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/peers/run.py {{args}}

# The GPU acceptance table (one NVIDIA GPU, < 8 min); `just gpu-acceptance --cpu` is the smoke.
gpu-acceptance *args:
    bash benchmarks/gpu/run.sh {{args}}

# Lint with ruff.
lint:
    {{python}} -m ruff check torchdist tests benchmarks examples
