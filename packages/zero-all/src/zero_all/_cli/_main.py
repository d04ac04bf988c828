"""The ``zero`` command: ``run``, ``report``, ``plan``, ``ckpt export``, ``generate`` and ``hf``.

Each subcommand is a thin shell over a function that can be called from Python
(:func:`zero_all._cli._run.plan_launch`, :func:`zero_all._cli._report.collect_report`,
:func:`zero_all._cli._plan.plan_memory`, :func:`zero_ckpt.export`, :func:`zero_all.init_inference`).
A user's mistake (a bad flag, a missing file, a checkpoint that is not one) is one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from ._errors import UsageError

__all__ = ["main"]

EPILOG = "Run `zero COMMAND --help` for a command's options. Docs: docs/cli.md."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(float(text)) if ("e" in text.lower() or "." in text) else int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _count(text: str) -> int:
    if text == "0":
        return 0
    return _positive(text)


# -- run ------------------------------------------------------------------------------------------
# zero's own options (all take a value), DeepSpeed launcher spellings included
RUN_VALUE_OPTIONS = frozenset({
    "--nproc", "--nproc-per-node", "--nproc_per_node", "--num_gpus", "--num_accelerators", "--nnodes",
    "--num_nodes", "--node-rank", "--node_rank", "--master-addr", "--master_addr", "--master-port",
    "--master_port", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-id", "--rdzv_id", "--hostfile", "-H"})
ZERO_PICKS = ("--rdzv-backend", "--rdzv_backend", "--standalone")  # zero chooses the rendezvous itself


def _torchrun_options() -> dict[str, bool]:
    """torchrun's options zero passes through as given: {option: takes a value}."""
    from torch.distributed import run as torchrun

    out = {}
    for action in torchrun.get_args_parser()._actions:
        for name in action.option_strings:
            if name not in RUN_VALUE_OPTIONS and name not in ("-h", "--help", "-m", "--module"):
                out[name] = action.nargs != 0
    return out


def split_run_argv(argv: list[str]) -> tuple[list[str], list[str], bool, str | None, list[str]]:
    """``zero run`` argv -> (zero's options, torchrun's options, module?, target, the target's arguments).

    Everything after the script (or ``-m MODULE``) is the script's, untouched: no option after it is
    read by zero or torchrun, and no option is matched by prefix."""
    passthrough = _torchrun_options()
    ours: list[str] = []
    extra: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if token == "--":
            return ours, extra, False, (argv[i + 1] if i + 1 < len(argv) else None), argv[i + 2:]
        if token in ("-m", "--module"):
            if i + 1 >= len(argv):
                raise UsageError(f"{token} needs a module name")
            return ours, extra, True, argv[i + 1], argv[i + 2:]
        if not token.startswith("-") or token == "-":
            return ours, extra, False, token, argv[i + 1:]
        if name in ZERO_PICKS:
            raise UsageError(f"{name}: zero run picks the rendezvous itself (standalone on one node; "
                             "--rdzv-endpoint for c10d, --master-addr/--master-port for static)")
        takes_value = name in RUN_VALUE_OPTIONS or passthrough.get(name, False)
        if name not in RUN_VALUE_OPTIONS and name not in passthrough and token not in ("-h", "--help"):
            raise UsageError(f"unknown option {name} (neither zero run's nor torchrun's; the script's own "
                             "options go after the script)")
        step = 2 if takes_value and "=" not in token else 1
        if takes_value and "=" not in token and i + 1 >= len(argv):
            raise UsageError(f"{name} needs a value")
        (ours if name in RUN_VALUE_OPTIONS or token in ("-h", "--help") else extra).extend(argv[i:i + step])
        i += step
    return ours, extra, False, None, []


def _cmd_run(args: argparse.Namespace) -> int:
    import importlib.util
    import os

    from ._run import LaunchError, plan_launch, run_launch

    try:
        plan = plan_launch(nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                           master_addr=args.master_addr, master_port=args.master_port,
                           rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id, hostfile=args.hostfile)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.module:
        top = args.script.split(".", 1)[0]
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # where `python -m` looks first, as the ranks will
        if not top or importlib.util.find_spec(top) is None:
            raise UsageError(f"no module named {top!r} (from here, {os.getcwd()})")
    elif not Path(args.script).is_file():
        raise UsageError(f"script {args.script} does not exist" if not Path(args.script).exists()
                         else f"script {args.script} is not a file")
    try:
        return run_launch(plan, args.script, args.script_args, module=args.module, extra=args.torchrun_args)
    except LaunchError as exc:
        raise UsageError(str(exc)) from None


# -- report ---------------------------------------------------------------------------------------
def _cmd_report(args: argparse.Namespace) -> int:
    from ._report import collect_report, format_report

    report = collect_report(args.nvme_path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# -- plan -----------------------------------------------------------------------------------------
def _cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from ._plan import PlanOptions, format_plans, load_model, model_shape, parse_model_args, plan_all, synthetic_shape

    options: dict[str, Any] = {k: getattr(args, k) for k in
                               ("precision", "optimizer", "bucket_numel", "prefetch_numel", "max_live_numel",
                                "persistence_threshold") if getattr(args, k) is not None}
    stages: list[int] | None = args.stage
    offloads: list[Any] | None = args.offload
    offload_param: Any = args.offload_param
    granularity_threshold = 0
    if args.config:
        from .._config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except (ConfigError, OSError) as exc:
            raise UsageError(str(exc)) from None
        zero = config.zero_optimization
        granularity_threshold = zero.stage3_module_granularity_threshold  # how stage 3 cuts its units
        from_config = {"bucket_numel": zero.reduce_bucket_size, "prefetch_numel": zero.stage3_prefetch_bucket_size,
                       "max_live_numel": zero.stage3_max_live_parameters,
                       "persistence_threshold": zero.stage3_param_persistence_threshold}
        for key, value in from_config.items():
            if value != "auto":
                options.setdefault(key, int(value))
        if config.bf16.enabled is True or config.fp16.enabled is True:
            options.setdefault("precision", "bf16" if config.bf16.enabled is True else "fp16")
        if config.optimizer is not None:
            options.setdefault("optimizer", config.optimizer.type.lower())
        stages = stages or [zero.stage]
        store, params = _config_offload(zero)
        offloads = offloads or [store]
        offload_param = offload_param or params
    if offload_param not in (None, "none"):
        stages = stages or [3]  # parameters are offloaded in stage 3 only (a stage listed besides is refused)
        offloads = offloads or [offload_param]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.model:
            shape = model_shape(load_model(args.model, parse_model_args(args.model_arg or [])), args.model,
                                granularity_threshold=granularity_threshold)
        else:
            shape = synthetic_shape(args.params, args.layers)
        plan_options = PlanOptions(world_size=args.world_size, backend="gloo" if device == "cpu" else "nccl",
                                   **options)
        plans = plan_all(shape, stages or [0, 1, 2, 3], offloads or ["none"], plan_options,
                         offload_param or "none")
    except (ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    ranks_per_node = args.ranks_per_node or min(args.world_size, 8)
    if args.json:
        print(json.dumps({"model": shape.name, "trainable_parameters": shape.numel,
                          "options": dataclasses.asdict(plan_options), "ranks_per_node": ranks_per_node,
                          "plans": [{"stage": p.stage, "offload": p.offload, "offload_param": p.offload_param,
                                     "device": p.device,
                                     "device_total": p.device_total, "host": p.host, "host_total": p.host_total,
                                     "host_total_per_node": p.host_total * ranks_per_node, "nvme": p.disk}
                                    for p in plans]}, indent=2))
    else:
        print(format_plans(plans, shape, plan_options, ranks_per_node))
    return 0


def _config_offload(zero: Any) -> tuple[str, str]:
    """(where the optimizer state goes, where stage 3's parameter shards go) for a config's zero block,
    as the engine builds its one store: offload_param nvme takes the optimizer state to NVMe too, and
    offload_param cpu lives in the optimizer's store, so it needs one."""
    store = zero.offload_optimizer.device if zero.offload_optimizer else ("cpu" if zero.cpu_offload else "none")
    params = zero.offload_param.device if zero.offload_param else "none"
    if params == "nvme":
        return "nvme", "nvme"
    if params == "cpu":
        if store == "none":
            raise UsageError("zero_optimization.offload_param.device 'cpu' needs offload_optimizer.device 'cpu' "
                             "too: zero keeps offloaded parameter shards in the optimizer's store")
        return store, store
    return store, "none"


# -- ckpt export ----------------------------------------------------------------------------------
def _cmd_ckpt_export(args: argparse.Namespace) -> int:
    import torch

    import zero_ckpt

    root = Path(args.dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    began = time.perf_counter()
    out = Path(args.out)
    warnings = logging.StreamHandler(sys.stderr)  # zero-ckpt's warnings (an older checkpoint) as our lines
    warnings.setFormatter(logging.Formatter("zero ckpt export: warning: %(message)s"))
    logging.getLogger("zero_ckpt").addHandler(warnings)
    try:
        reader = zero_ckpt.CheckpointReader(root, args.tag)
        print(f"zero ckpt export: reading {reader.dir} (written by {len(reader.manifests)} ranks)", file=sys.stderr,
              flush=True)
        state = zero_ckpt.consolidate(root, reader.tag, prefix=args.prefix, dtype=dtype,
                                      frozen=not args.exclude_frozen)
        zero_ckpt.save_state_dict(state, out)
    except zero_ckpt.CheckpointError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{exc.filename or args.out}: {exc.strerror or exc}") from None
    finally:
        logging.getLogger("zero_ckpt").removeHandler(warnings)
    size = out.stat().st_size
    print(f"zero ckpt export: wrote {out} ({len(state)} tensors, {size / 2**20:.1f} MiB, {args.dtype}) "
          f"in {time.perf_counter() - began:.1f}s", file=sys.stderr)
    return 0


# -- the parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zero", allow_abbrev=False, description="zero: ZeRO training on torch.distributed -- "
                     "launch, inspect this machine, plan memory, export checkpoints.", epilog=EPILOG)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"zero-all {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", allow_abbrev=False,
                         help="launch a training script on every rank (through torchrun)",
                         description="Launch SCRIPT on every rank of this node through torch's own launcher "
                         "(torch.distributed.run). One node: standalone rendezvous. Several nodes: run this on "
                         "each, with --rdzv-endpoint/--rdzv-id (c10d), --master-addr/--master-port/--node-rank "
                         "(static), or --hostfile. The exit status is the failing rank's.",
                         epilog="example: zero run --nproc 2 train.py --epochs 1")
    run.add_argument("--nproc", "--nproc-per-node", "--nproc_per_node", "--num_gpus", "--num_accelerators",
                     dest="nproc", type=_positive, default=None,
                     help="ranks on this node (default: one per CUDA device, else 2)")
    run.add_argument("--nnodes", "--num_nodes", dest="nnodes", type=_positive, default=None,
                     help="nodes in the job (default 1)")
    run.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
                     help="this node's index (static rendezvous)")
    run.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None,
                     help="static rendezvous: node 0's address")
    run.add_argument("--master-port", "--master_port", dest="master_port", type=_positive, default=None,
                     help="static rendezvous: its port (29500)")
    run.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", default=None, metavar="HOST:PORT",
                     help="c10d rendezvous endpoint, the same on every node")
    run.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", default=None,
                     help="job id for the c10d rendezvous, the same on every node")
    run.add_argument("--hostfile", "-H", dest="hostfile", default=None,
                     help="DeepSpeed hostfile ('host slots=N' per line): sets --nnodes and --nproc")
    run.add_argument("script", nargs="?", help="the training script (or -m MODULE); torchrun's other options "
                     "(--max-restarts, --tee, --log-dir, --monitor-interval, ...) are passed to it as given")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script, untouched")
    run.set_defaults(func=_cmd_run)

    report = sub.add_parser("report", help="versions, devices, backends, kernels and offload stores usable here",
                            description="Report what this machine can run: library and zero package versions, "
                            "CPUs and CUDA devices, torch.distributed backends, which zero-kernels path runs "
                            "(Triton, interpreter, torch reference), and whether the offload stores work here "
                            "(pinned host memory; an O_DIRECT write for NVMe).")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.add_argument("--nvme-path", default=None, help="directory to probe for NVMe offload (default: $TMPDIR)")
    report.set_defaults(func=_cmd_report)

    plan = sub.add_parser("plan", allow_abbrev=False, help="per-rank memory for each ZeRO stage and offload choice",
                          description="Estimate the peak bytes each rank holds while training: parameters, "
                          "gradients, fp32 master weights, optimizer state, ZeRO's buffers and the step's "
                          "transient working set, per device and per host, from what zero-optim allocates. "
                          "Activations are not included.",
                          epilog="example: zero plan --params 7e9 --world-size 8 --precision bf16")
    what = plan.add_mutually_exclusive_group(required=True)
    what.add_argument("--params", type=_positive, help="trainable parameters (e.g. 7e9)")
    what.add_argument("--model", metavar="MODULE:FACTORY",
                      help="import MODULE and call FACTORY() on the meta device (nothing is allocated)")
    plan.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                      help="with --model: an argument for FACTORY (VALUE read as JSON, else a string), or a JSON "
                      "object; repeatable. A factory taking one config object gets it built from these")
    plan.add_argument("--world-size", type=_positive, required=True, help="data-parallel ranks")
    plan.add_argument("--stage", type=int, nargs="+", choices=(0, 1, 2, 3), default=None,
                      help="stages to show (default: all)")
    plan.add_argument("--offload", nargs="+", choices=("none", "cpu", "nvme"), default=None,
                      help="where the optimizer state lives (default: none)")
    plan.add_argument("--offload-param", choices=("none", "cpu", "nvme"), default=None,
                      help="stage 3: where the parameter and gradient shards live (default: none); they share "
                      "the optimizer's store, so --offload must match")
    plan.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="training dtype (fp32)")
    plan.add_argument("--optimizer", choices=("adamw", "adam", "sgd", "lion", "lamb"), default=None,
                      help="update rule (adamw): its state tensors per parameter")
    plan.add_argument("--layers", type=_positive, default=24,
                      help="with --params: blocks the model is split into (stage-3 gather units)")
    plan.add_argument("--bucket-numel", type=_positive, default=None, help="stages 0-2 bucket elements (2**24)")
    plan.add_argument("--prefetch-numel", type=_count, default=None, help="stage 3 prefetch window (5e7)")
    plan.add_argument("--max-live-numel", type=_count, default=None, help="stage 3 gathered cap (1e9)")
    plan.add_argument("--persistence-threshold", type=_count, default=None,
                      help="stage 3: parameters this small stay whole (1e5)")
    plan.add_argument("--config", default=None,
                      help="a ds_config file: its stage, buckets, precision, optimizer, offload devices")
    plan.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="where training runs: cpu adds Gloo's gather scratch (default: cuda if present)")
    plan.add_argument("--ranks-per-node", type=_positive, default=None,
                      help="ranks sharing a host, for the per-node row (default: min(world size, 8))")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=_cmd_plan)

    ckpt = sub.add_parser("ckpt", help="checkpoint tools", description="Checkpoint tools.")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", metavar="COMMAND", parser_class=_Parser)
    export = ckpt_sub.add_parser("export", help="one consolidated fp32 state_dict from a zero checkpoint",
                                 description="Read a zero checkpoint (any stage, any world size) and write the "
                                 "model's state_dict -- fp32 master weights, untrained weights, buffers, tied "
                                 "weights under each of their names -- so that load_state_dict(strict=True) takes "
                                 "it: torch.save, or safetensors when OUT ends with .safetensors.",
                                 epilog="example: zero ckpt export ckpts/ model.pt")
    export.add_argument("dir", help="the checkpoint directory (the one holding 'latest')")
    export.add_argument("out", help="output file (.pt, .bin, or .safetensors)")
    export.add_argument("--tag", default=None, help="which checkpoint (default: the one 'latest' names)")
    export.add_argument("--prefix", default=None,
                        help="export the tensors under this prefix as they are (default: the model's state_dict)")
    export.add_argument("--exclude-frozen", action="store_true",
                        help="leave out the weights the optimizer did not train")
    export.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="output dtype")
    export.set_defaults(func=_cmd_ckpt_export, command="ckpt export")
    ckpt.set_defaults(func=lambda _: _help(ckpt))

    from .._inference._cli import add_generate_parser

    add_generate_parser(sub, _positive)
    from .._hf._install import add_hf_parser

    add_hf_parser(sub)
    return parser


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    run_split = None
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv[1:2]):
        try:
            run_split = split_run_argv(argv[1:])
        except UsageError as exc:
            print(f"zero run: error: {exc}", file=sys.stderr)
            return 2
        ours, _, _, target, _ = run_split
        argv = ["run", *ours, *(["--", target] if target is not None else [])]
    args = parser.parse_args(argv)
    if run_split is not None:
        args.torchrun_args, args.module, args.script_args = run_split[1], run_split[2], run_split[4]
        if args.script is None:
            print("zero run: error: give the script to run (or -m MODULE)", file=sys.stderr)
            return 2
    if not getattr(args, "func", None):
        return _help(parser)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"zero {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zero {args.command}: interrupted", file=sys.stderr)
        return 130
