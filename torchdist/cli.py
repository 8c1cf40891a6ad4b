"""The ``torchdist`` command: ``launch``, ``env``, ``estimate-memory``, ``plot``.

``torchdist launch`` is a thin front on ``torch.distributed.run`` (torchrun), run in this process:
elastic restarts (``--max-restarts``) and the multi-node c10d rendezvous come from it (node
``--node-rank 0`` hosts the rendezvous at ``--master-addr:--master-port``). A node missing after
``--rdzv-timeout`` is one line and exit status 1, and so is a failed job (torchrun's summary,
no agent traceback). ``--timeout`` reaches every rank's ``Topology.from_env`` as
``TORCHDIST_TIMEOUT``: the world's collective timeout (``docs/faults.md``). It says what it
chose, and passes ``--mesh`` to the script through ``TORCHDIST_MESH``, which
``Topology.from_env`` reads when the script names no axes. A script under it always sees the
real world (``Topology.from_env`` reads torchrun's variables), so the Accelerate trap (a
GPU-less launcher silently running N independent single-process trainings) cannot happen. It
checks ``-n``, the script path and ``--mesh`` against the world before it starts any rank.

Bad arguments anywhere print one line on stderr (``torchdist <command>: error: ...``) and exit
with status 2, never a traceback.

Example::

    torchdist launch -n 4 --mesh dp_shard=2,tp=2 train.py --steps 100
    torchdist env
    torchdist estimate-memory --params 7e9 --world 8
    torchdist plot runs/exp1/metrics.jsonl
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


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def launch_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str], str]:
    """The torchrun command line, the environment it adds, and a sentence saying what it chose.

    Raises ``UsageError`` (one line) for ``-n`` below 1, a script that is not a file, or a
    ``--mesh`` that does not fit the world (``-n`` x ``--nnodes``), before anything starts.
    """
    import torch

    from torchdist.errors import TopologyError
    from torchdist.topology import Topology, parse_mesh

    if args.nproc is not None and args.nproc < 1:
        raise UsageError(f"-n {args.nproc}: expected at least one process per node, e.g. -n 2")
    if args.nnodes < 1:
        raise UsageError(f"--nnodes {args.nnodes}: expected at least 1")
    if not os.path.isfile(args.script):
        where = "a directory" if os.path.isdir(args.script) else "no such file"
        raise UsageError(f"script {args.script!r}: {where}; expected the path of a Python script")
    if args.nproc is not None:
        nproc, why = args.nproc, f"-n {args.nproc}"
    elif torch.cuda.is_available():
        nproc, why = torch.cuda.device_count(), "one process per local GPU"
    else:
        nproc, why = 1, "no GPU here and no -n: one CPU process (use -n N for N CPU ranks)"
    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank}: expected 0 <= node rank < --nnodes")
    for name in ("timeout", "rdzv_timeout"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected > 0 s")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if args.nnodes > 1:
        # c10d (not torchrun's static default): rendezvous rounds, so restarts and late nodes
        # work; node 0 hosts the store, the others only connect (all may share one host)
        addr = args.master_addr or "127.0.0.1"
        cmd += [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            f"--master-addr={addr}",
            f"--master-port={args.master_port}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={addr}:{args.master_port}",
            f"--rdzv-id={args.rdzv_id}",
            f"--rdzv-conf=join_timeout={args.rdzv_timeout:g},"
            f"is_host={'true' if args.node_rank == 0 else 'false'}",
        ]
    elif args.master_addr:
        cmd += [
            "--nnodes=1",
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}",
        ]
    else:
        cmd.append("--standalone")
    cmd += [f"--max-restarts={args.max_restarts}", args.script, *args.script_args]
    env = {"TORCHDIST_TIMEOUT": f"{args.timeout:g}"}
    world = nproc * args.nnodes
    if args.mesh:
        try:  # fail here, not in every rank
            Topology(world_size=world, **parse_mesh(args.mesh))
        except TopologyError as exc:
            raise UsageError(f"--mesh {args.mesh} on world {world} ({why}): {exc}") from None
        env["TORCHDIST_MESH"] = args.mesh
    said = (
        f"torchdist launch: {nproc} process(es) per node x {args.nnodes} node(s) = world {world} "
        f"({why})" + (f", mesh {args.mesh}" if args.mesh else "")
    )
    return cmd, env, said


def _launch(args: argparse.Namespace) -> int:
    cmd, env, said = launch_command(args)
    print(said, file=sys.stderr, flush=True)
    os.environ.update(env)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import get_args_parser, run

    where = f"{args.master_addr or '127.0.0.1'}:{args.master_port}"
    try:
        run(get_args_parser().parse_args(cmd[3:]))
    except ChildFailedError as exc:  # the ranks printed their tracebacks; torchrun's summary
        print(exc.format_msg(), file=sys.stderr)
        return 1
    except SignalException as exc:  # the launcher itself was told to stop (Ctrl-C, scancel)
        print(f"torchdist launch: stopped by {exc.sigval.name}; the ranks were ended.",
              file=sys.stderr)  # fmt: skip
        return 128 + int(exc.sigval)
    except RendezvousTimeoutError:
        print(
            f"torchdist launch: error: not all {args.nnodes} nodes joined the rendezvous at "
            f"{where} within --rdzv-timeout {args.rdzv_timeout:g} s. Start `torchdist launch "
            f"--nnodes {args.nnodes} --node-rank I --master-addr ADDR --master-port "
            f"{args.master_port}` on every node (I = 0 .. {args.nnodes - 1}, node 0 at ADDR), "
            "and check that each can reach ADDR:PORT.",
            file=sys.stderr,
        )
        return 1
    except RendezvousError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"torchdist launch: error: rendezvous at {where} failed ({type(exc).__name__}: "
            f"{first}). Node 0 hosts it: start it first and check --master-addr/--master-port.",
            file=sys.stderr,
        )
        return 1
    return 0


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
    from torchdist.memory import format_table, load_config, params_from_model
    from torchdist.topology import Topology, parse_mesh

    if (args.params is None) == (args.model is None):
        raise UsageError("give exactly one of --params N or --model CONFIG_OR_DIR")
    if (args.seq is None) != (args.batch is None):
        raise UsageError("activations need both --seq and --batch (per data-parallel rank)")
    config, how = None, "as given"
    if args.model is not None:
        config = load_config(args.model)
        params, how = params_from_model(args.model)
    else:
        params = args.params
    if args.seq is not None and config is None:
        raise UsageError("activations need the model's shapes: use --model instead of --params")
    topo = Topology(world_size=args.world, **parse_mesh(args.mesh or ""))
    optimizers = (args.optimizer,) if args.optimizer else None
    print(f"parameters: {params:,.0f} ({how})")
    print(format_table(params, topo, optimizers=optimizers, dtype=args.dtype, config=config,
                       seq=args.seq, batch=args.batch))  # fmt: skip
    from torchdist.memory import inference_table

    print(inference_table(params, config=config))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from torchdist._plot import plot_metrics

    if not os.path.isfile(args.jsonl):
        raise UsageError(f"{args.jsonl!r}: no such file; expected MetricsLogger's metrics.jsonl")
    out = args.out or os.path.join(os.path.dirname(args.jsonl) or ".", "loss.png")
    keys = [k for k in args.keys.split(",") if k] if args.keys else None
    drawn = plot_metrics(args.jsonl, out, keys=keys, smoothing=args.smoothing, log_y=args.log_y)
    print(f"{out}: {', '.join(drawn)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from torchdist.memory import DTYPES, OPTIMIZERS

    parser = _Parser(prog="torchdist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"torchdist {_version('torchdist')}",
                        help="print the installed torchdist version and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; COMMAND --help for its options")
    launch = sub.add_parser("launch", help="run a script on N ranks (torchrun underneath)",
                            description="Run SCRIPT on N ranks through torchrun.")  # fmt: skip
    launch.add_argument("-n", "--nproc", type=int, default=None,
                        help="processes per node (default: one per GPU, or 1 on a CPU machine)")
    launch.add_argument("--nnodes", type=int, default=1, help="number of hosts (default 1)")
    launch.add_argument("--node-rank", type=int, default=0, help="this host's index (0-based)")
    launch.add_argument("--master-addr", default="",
                        help="address of the host with --node-rank 0 (multi-node)")
    launch.add_argument("--master-port", type=int, default=29500,
                        help="rendezvous port on the master host (default 29500)")
    launch.add_argument("--max-restarts", type=int, default=0,
                        help="restart the whole job this many times after a rank fails (the "
                        "script resumes from its newest checkpoint)")
    launch.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a rank waits in a collective for its peers before the job "
                        "fails with that error (Topology.timeout; default 600)")
    launch.add_argument("--rdzv-timeout", type=float, default=600.0,
                        help="seconds the nodes have to join the rendezvous (default 600)")
    launch.add_argument("--rdzv-id", default="torchdist",
                        help="job id shared by the nodes of one multi-node job")
    launch.add_argument("--mesh", default="",
                        help="mesh axes for Topology.from_env, e.g. dp_shard=2,tp=2 (checked "
                        "against the world before starting)")
    launch.add_argument("script", help="the Python script every rank runs")
    launch.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="arguments passed to the script unchanged")
    launch.set_defaults(run=_launch)
    env = sub.add_parser("env", help="versions, devices and backends, for bug reports",
                         description="Print versions, devices, backends and extras.")
    env.set_defaults(run=_env)
    est = sub.add_parser("estimate-memory", help="per-rank memory per strategy (no download)",
                         description="Per-rank memory of model state (and optionally "
                         "activations) for each strategy; the assumptions are printed with it.")
    est.add_argument("--params", type=float, default=None, help="parameter count, e.g. 7e9")
    est.add_argument("--model", "--config", dest="model", default=None,
                     help="a local Hugging Face config.json or model directory (exact count "
                     "from its safetensors headers when present); nothing is downloaded")
    est.add_argument("--world", type=int, default=1, help="number of ranks (default 1)")
    est.add_argument("--mesh", default="", help="e.g. dp_shard=4,tp=2 (default: dp_shard fills)")
    est.add_argument("--dtype", choices=tuple(DTYPES), default="bf16",
                     help="compute dtype: bf16/fp16 = mixed precision with fp32 master weights "
                     "(default bf16); fp32 = none")
    est.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=None,
                     help="one optimizer (default: a row for each)")
    est.add_argument("--seq", type=int, default=None,
                     help="sequence length, to estimate activations (needs --model, --batch)")
    est.add_argument("--batch", type=int, default=None,
                     help="micro-batch per data-parallel rank, to estimate activations")
    est.set_defaults(run=_estimate)
    plot = sub.add_parser("plot", help="draw metrics.jsonl (MetricsLogger) as PNG curves",
                          description="Curves of a MetricsLogger run, the whole run across "
                          "resumes (needs matplotlib).")
    plot.add_argument("jsonl", help="the metrics.jsonl a MetricsLogger wrote")
    plot.add_argument("-o", "--out", default="", help="PNG to write (default: loss.png beside it)")
    plot.add_argument("--keys", default="",
                      help="comma-separated metrics to draw (default: all), e.g. loss,grad_norm")
    plot.add_argument("--smoothing", type=float, default=0.6,
                      help="TensorBoard-style EMA weight in [0, 1); 0 draws raw values only")
    plot.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    plot.set_defaults(run=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``torchdist`` command. Bad arguments: one line on stderr, exit status 2."""
    from torchdist.errors import TorchdistError

    parser = _parser()
    args = parser.parse_args(argv)
    prog = f"torchdist {args.command}"
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except (TorchdistError, ImportError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"{prog}: error: {' '.join(first)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
