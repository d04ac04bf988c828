"""``zero generate``: text from a model on the command line, through :func:`init_inference`.

The model is a Hugging Face directory (``config.json`` and weights, as ``save_pretrained``
writes it; a directory or ``config.json`` without weights is built with random weights
from ``--seed``) or ``MODULE:FACTORY`` (the project's ``examples/gpt.py`` is
``gpt:GPT``) with ``--checkpoint`` naming its weights (a zero checkpoint directory or a
state_dict file). Text is encoded by the directory's tokenizer, by ``--tokenizer
MODULE:FACTORY`` (an object with ``encode``/``decode``), or given as ``--prompt-ids``.
``--tp N`` relaunches the command on N ranks with ``zero run``; rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._cli._errors import UsageError

__all__ = ["add_generate_parser"]


def add_generate_parser(sub: Any, positive: Any) -> None:
    about = __doc__.split("\n\n")[1].replace("\n", " ").replace("``", "")
    gen = sub.add_parser("generate", allow_abbrev=False, help="generate text with init_inference (TP, int8, "
                         "ZeRO-Inference)", description=about,
                         epilog="examples: zero generate --model ./my-gpt2 --prompt 'Hello' --max-new-tokens 20; "
                         "zero generate --model gpt:GPT --checkpoint demo-output/checkpoints --tokenizer "
                         "gpt:CharCorpus --prompt 'def ' --tp 2")
    gen.add_argument("--model", required=True, help="a Hugging Face model directory or config.json, or "
                     "MODULE:FACTORY (the current directory is importable)")
    gen.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="with MODULE:FACTORY: an argument "
                     "for FACTORY (VALUE read as JSON); repeatable")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue")
    what.add_argument("--prompt-ids", help="the token ids to continue, comma-separated")
    gen.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer directory or MODULE:FACTORY "
                     "(an object with encode(text) and decode(ids)); default: the model directory's")
    gen.add_argument("--checkpoint", default=None, help="weights: a zero checkpoint directory or a state_dict file")
    gen.add_argument("--max-new-tokens", type=positive, default=32)
    gen.add_argument("--dtype", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    gen.add_argument("--tp", type=positive, default=1, help="tensor-parallel ranks (launched with zero run)")
    gen.add_argument("--offload", choices=("none", "cpu", "nvme"), default="none",
                     help="ZeRO-Inference: stream the layers' weights from host memory or NVMe")
    gen.add_argument("--nvme-path", default=None, help="with --offload nvme: where the weights' files go")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of taking the likeliest token")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0, help="for random weights and for sampling")
    gen.set_defaults(func=cmd_generate)


def _import(spec: str, what: str, kwargs: dict[str, object] | None = None) -> Any:
    from .._cli._plan import load_model

    try:
        if what == "model":
            return load_model(spec, kwargs, meta=False)
        module, _, attr = spec.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        import importlib

        return getattr(importlib.import_module(module), attr)()
    except (ValueError, ImportError, AttributeError) as exc:
        message = str(exc)
        raise UsageError(message if message.startswith(f"--{what} ") else f"--{what} {spec}: {message}") from None


def _hf_model(path: Path, seed: int) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise UsageError(f"--model {path}: a Hugging Face model needs transformers "
                         "(pip install 'zero-all[hf]')") from None
    directory = path if path.is_dir() else path.parent
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))
    if has_weights and (path.is_dir() or path.name == "config.json"):
        return transformers.AutoModelForCausalLM.from_pretrained(str(directory))
    config = transformers.AutoConfig.from_pretrained(str(path))
    print(f"zero generate: {path} holds no weights: random weights from --seed {seed}", file=sys.stderr)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def _tokenizer(args: argparse.Namespace, model_path: Path | None) -> Any:
    if args.tokenizer and ":" in args.tokenizer and not Path(args.tokenizer).exists():
        return _import(args.tokenizer, "tokenizer")
    where = Path(args.tokenizer) if args.tokenizer else model_path
    if where is not None and where.is_file():
        where = where.parent
    if where is not None and where.is_dir() and any(where.glob("tokenizer*")):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(where))
    if args.prompt is not None:
        which = f"--tokenizer {args.tokenizer} holds no tokenizer" if args.tokenizer else "the model has no tokenizer"
        raise UsageError(f"--prompt needs a tokenizer: {which}; give --tokenizer or --prompt-ids")
    return None


def _relaunch(tp: int) -> int:
    cmd = [sys.executable, "-m", "zero_all", "run", "--nproc", str(tp), "-m", "zero_all", *sys.argv[1:]]
    return subprocess.call(cmd)


def cmd_generate(args: argparse.Namespace) -> int:
    from .._config import ConfigError
    from ._engine import init_inference

    if args.offload == "nvme" and not args.nvme_path:
        raise UsageError("--offload nvme needs --nvme-path (where the weights' files go)")
    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(args.tp)
    try:
        path = None if (":" in args.model and not Path(args.model).exists()) else Path(args.model)
        if path is None:
            from .._cli._plan import parse_model_args

            torch.manual_seed(args.seed)
            model = _import(args.model, "model", parse_model_args(args.model_arg or []))
        elif not path.exists():
            raise UsageError(f"--model {path} does not exist")
        else:
            model = _hf_model(path, args.seed)
        tokenizer = _tokenizer(args, path)
        ids = (torch.tensor([[int(t) for t in args.prompt_ids.split(",")]]) if args.prompt_ids is not None
               else torch.as_tensor(tokenizer.encode(args.prompt)).reshape(1, -1))
        offload = ({"device": args.offload, "nvme_path": args.nvme_path} if args.offload != "none" else None)
        config: dict[str, Any] = {"dtype": args.dtype, "tensor_parallel": {"tp_size": args.tp},
                                  "max_out_tokens": ids.shape[1] + args.max_new_tokens}
        if args.checkpoint:
            config["checkpoint"] = args.checkpoint
        if offload is not None:
            config["zero"] = {"stage": 3, "offload_param": offload}
        engine = init_inference(model, config=config)
        began = time.perf_counter()
        out = engine.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              generator=torch.Generator().manual_seed(args.seed) if args.do_sample else None)
        took = time.perf_counter() - began
    except (ConfigError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        new = out[0, ids.shape[1]:].tolist()
        text = tokenizer.decode(out[0]) if tokenizer is not None else json.dumps(out[0].tolist())
        print(text)
        print(f"zero generate: {len(new)} tokens in {took:.2f} s ({len(new) / max(took, 1e-9):.1f} tokens/s), "
              f"{type(engine.module).__name__}, {args.dtype}, tp {args.tp}"
              + (f", weights streamed from {args.offload}" if args.offload != "none" else ""), file=sys.stderr)
    return 0
