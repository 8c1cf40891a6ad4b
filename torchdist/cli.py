"""The ``torchdist`` command: ``launch``, ``env``, ``estimate-memory``.

``torchdist launch`` is a thin front on ``torch.distributed.run`` (torchrun): elastic restarts and
multi-node rendezvous come from it. It says what it chose, and passes ``--mesh`` to the script
through ``TORCHDIST_MESH``, which ``Topology.from_env`` reads when the script names no axes. A
script under it always sees the real world (``Topology.from_env`` reads torchrun's variables), so
the Accelerate trap — a GPU-less launcher silently running N independent single-process
trainings — cannot happen.

Example::

    torchdist launch -n 4 --mesh dp_shard=2,tp=2 train.py --steps 100
    torchdist env
    torchdist estimate-memory --params 7e9 --world 8
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence

__all__ = ["main", "launch_command"]

_EXTRAS = {
    "torchao": "fp8 training (autocast_fp8) and low-bit optimizers — pip install 'torchdist[fp8]'",
    "deepspeed": "DeepSpeed ZeRO 1-3 and offload — pip install 'torchdist[deepspeed]'",
    "msamp": "MS-AMP O1/O2 (CUDA only; not on PyPI: install from github.com/Azure/MS-AMP)",
    "tensorboard": "TensorBoard event files from MetricsLogger",
}


def launch_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str], str]:
    """The torchrun command line, the environment it adds, and a sentence saying what it chose."""
    import torch

    from torchdist.topology import parse_mesh

    if args.nproc is not None:
        nproc, why = args.nproc, f"-n {args.nproc}"
    elif torch.cuda.is_available():
        nproc, why = torch.cuda.device_count(), "one process per local GPU"
    else:
        nproc, why = 1, "no GPU here and no -n: one CPU process (use -n N for N CPU ranks)"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if args.nnodes > 1 or args.master_addr:
        cmd += [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr or '127.0.0.1'}",
            f"--master-port={args.master_port}",
        ]
    else:
        cmd.append("--standalone")
    cmd += [f"--max-restarts={args.max_restarts}", args.script, *args.script_args]
    env = {}
    if args.mesh:
        parse_mesh(args.mesh)  # fail here, not in every rank
        env["TORCHDIST_MESH"] = args.mesh
    world = nproc * args.nnodes
    said = (
        f"torchdist launch: {nproc} process(es) per node x {args.nnodes} node(s) = world {world} "
        f"({why})" + (f", mesh {args.mesh}" if args.mesh else "")
    )
    return cmd, env, said


def _launch(args: argparse.Namespace) -> int:
    cmd, env, said = launch_command(args)
    print(said, file=sys.stderr, flush=True)
    os.environ.update(env)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _env(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    print(f"torchdist   {_version('torchdist')}")
    print(f"python      {platform.python_version()} ({platform.platform()})")
    for name in ("torch", "optree", "safetensors", "torchao", "deepspeed", "msamp", "numpy"):
        print(f"{name:<11} {_version(name)}")
    print(
        f"cuda        {torch.version.cuda or 'CPU build'}; available: {torch.cuda.is_available()}"
    )
    for index in range(torch.cuda.device_count()):
        print(f"  cuda:{index}    {torch.cuda.get_device_name(index)}")
    backends = {
        "gloo": dist.is_gloo_available(),
        "nccl": dist.is_nccl_available(),
        "mpi": dist.is_mpi_available(),
    }
    print("backends    " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in backends.items()))
    print(f"cpu cores   {os.cpu_count()}")
    print("extras:")
    for name, what in _EXTRAS.items():
        mark = "yes" if _version(name) != "not installed" else "no "
        print(f"  [{mark}] {name:<12} {what}")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from torchdist.memory import format_table, params_from_config
    from torchdist.topology import Topology, parse_mesh

    if (args.params is None) == (args.config is None):
        print("estimate-memory: give exactly one of --params N or --config FILE", file=sys.stderr)
        return 2
    params = args.params if args.params is not None else params_from_config(args.config)
    topo = Topology(world_size=args.world, **parse_mesh(args.mesh or ""))
    print(format_table(params, topo))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchdist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch", help="run a script on N ranks (torchrun underneath)")
    launch.add_argument("-n", "--nproc", type=int, default=None, help="processes per node")
    launch.add_argument("--nnodes", type=int, default=1)
    launch.add_argument("--node-rank", type=int, default=0)
    launch.add_argument("--master-addr", default="")
    launch.add_argument("--master-port", type=int, default=29500)
    launch.add_argument("--max-restarts", type=int, default=0)
    launch.add_argument("--mesh", default="", help="mesh axes, e.g. dp_shard=2,tp=2")
    launch.add_argument("script")
    launch.add_argument("script_args", nargs=argparse.REMAINDER)
    launch.set_defaults(run=_launch)
    env = sub.add_parser("env", help="versions, devices and backends, for bug reports")
    env.set_defaults(run=_env)
    est = sub.add_parser("estimate-memory", help="per-rank model-state bytes per strategy")
    est.add_argument("--params", type=float, default=None, help="parameter count, e.g. 7e9")
    est.add_argument("--config", default=None, help="a Hugging Face style config.json")
    est.add_argument("--world", type=int, default=1)
    est.add_argument("--mesh", default="", help="e.g. dp_shard=4,tp=2 (default: dp_shard fills)")
    est.set_defaults(run=_estimate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
