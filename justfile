# torchdist tasks. `just --list` shows them.

python := if path_exists(".venv/bin/python") == "true" { ".venv/bin/python" } else { "python" }

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

# Lint with ruff.
lint:
    {{python}} -m ruff check torchdist tests benchmarks examples
