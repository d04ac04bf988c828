"""Greedy decoding with zero's inference engine against Hugging Face eager ``generate``, in one run.

    python benchmarks/inference.py [--quick] [--rounds 7] [--new-tokens 128] [--out benchmarks/results]

Three measurements, each against its baseline taken in the same run, ours and the
baseline taking turns (the order flips every round) so drift on a shared machine hits
both alike; figures are medians over rounds. Every process runs one torch thread.

1. Throughput: a Hugging Face GPT-2 built from a small config (random init, seed 0, no
   download) generates ``--new-tokens`` greedy tokens after a 16-token prompt, through
   ``zero_all.init_inference`` (fp32 and int8 weights, tp_size 1 and 2) and through HF's
   own eager ``model.generate(ids, max_new_tokens=N, do_sample=False)`` on the same
   weights. tp 2 runs on 2 Gloo ranks (rank 0's time); the HF baseline is one process,
   measured in the same rounds, once beside each case. ratio = our tokens/s / HF eager
   tokens/s, taken per round from an HF run and ours back to back (their order
   alternating), median over rounds; the tokens/s columns are medians of the same runs.
   Sanity: fp32 at tp 1 must produce HF's tokens exactly.
2. Time per token against sequence length: for each length L, a prompt of L - 16 random
   tokens and 17 greedy tokens, every token timestamped (``on_token`` for ours, a
   streamer for HF); the figure at L is the median of the 16 decode steps, which attend
   over L - 15 ... L positions. Ours and HF run back to back at each L, alternating.
3. KV cache: the project's GPT (examples/gpt.py, block_size 1024) decodes through the
   engine with a preallocated ``zero_pipe.KVCache`` against a no-cache eager loop that
   recomputes the whole sequence each token (timed over the same 16 steps up to each L,
   tokens checked against ours). Reports the cache's bytes per token (``nbytes() / max_len``) and
   the slope of time per token against position.

Goal: ratio >= 1.0 against HF eager at tp_size 1, fp32, on CPU. Writes ``inference.json``
and ``inference.png`` and prints a markdown table; a ratio under its goal reads MISSED.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))  # spawned ranks start from the filtered path below: put this folder back first
from _common import goal as record_goal  # noqa: E402

# benchmarks/kernels.py would shadow the Hub's ``kernels`` package, which transformers probes for on import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import zero_all  # noqa: E402
import zero_comm  # noqa: E402
import zero_pipe  # noqa: E402
from zero_comm.testing import run_ranks  # noqa: E402

sys.path.insert(0, str(_HERE.parent / "examples"))
from gpt import GPT, GPTConfig  # noqa: E402

HF_CONFIG = {"n_layer": 4, "n_embd": 256, "n_head": 8, "vocab_size": 2048, "n_positions": 1024}
GPT_CONFIG = GPTConfig(vocab_size=2048, block_size=1024, n_layer=4, n_head=8, n_embd=256)
PROMPT = 16
WINDOW = 16  # decode steps per sequence-length figure
CASES = (("fp32", 1), ("int8", 1), ("fp32", 2), ("int8", 2))  # (weights, tp_size)
GOALS = {("fp32", 1): 1.0}
DTYPES = {"fp32": torch.float32, "int8": torch.int8}


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**HF_CONFIG, bos_token_id=None, eos_token_id=None)).eval()
    model.generation_config.pad_token_id = 0
    return model


def _prompt(vocab: int, length: int = PROMPT) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(1))


def _hf_generate(model, ids: torch.Tensor, new: int, streamer=None) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=new, do_sample=False, streamer=streamer)


def measure_throughput(rounds: int, new: int) -> dict:
    """On every rank: rank 0 runs the HF baseline and the tp-1 engines alone, both ranks the tp-2 engines."""
    comm = zero_comm.init_distributed()
    lead = comm.rank == 0
    ids = _prompt(HF_CONFIG["vocab_size"])
    ways, ratio = {}, None
    if lead:
        hf = _gpt2()
        ways["hf"] = lambda: _hf_generate(hf, ids, new)
    for weights, tp in CASES:
        if tp == 1 and not lead:
            continue
        engine = zero_all.init_inference(_gpt2(), dtype=DTYPES[weights], tensor_parallel={"tp_size": tp})
        ways[(weights, tp)] = lambda e=engine: e.generate(ids, max_new_tokens=new)
        if weights == "int8" and lead:
            ratio = engine.quantized.ratio
    order = ["hf", *CASES]
    times: dict = {w: [] for w in order}
    pairs: dict = {c: [] for c in CASES}  # HF time / ours, from back-to-back runs
    hf_by_case: dict = {c: [] for c in CASES}  # the HF runs paired with each case
    tokens = {}
    for w in order:  # warm up, and keep each way's tokens
        comm.barrier()
        if w in ways:
            tokens[w] = ways[w]()
    for r in range(rounds):
        for k, case in enumerate(CASES if r % 2 == 0 else CASES[::-1]):
            got = {}
            for w in ("hf", case) if (r + k) % 2 == 0 else (case, "hf"):
                comm.barrier()
                if w in ways:
                    start = time.perf_counter()
                    ways[w]()
                    got[w] = time.perf_counter() - start
                    times[w].append(got[w])
            if lead:
                pairs[case].append(got["hf"] / got[case])
                hf_by_case[case].append(got["hf"])
    if not lead:
        return {}
    ref = tokens["hf"][0, PROMPT:]
    agree = {f"{w}-tp{tp}": (tokens[(w, tp)][0, PROMPT:] == ref).float().mean().item() for w, tp in CASES}
    return {"times": {("hf" if w == "hf" else f"{w[0]}-tp{w[1]}"): t for w, t in times.items()},
            "pair_ratios": {f"{w}-tp{tp}": v for (w, tp), v in pairs.items()},
            "hf_paired": {f"{w}-tp{tp}": v for (w, tp), v in hf_by_case.items()},
            "agreement": agree, "int8_ratio": ratio}


class _Stamps:
    """A Hugging Face streamer that timestamps every new token (the first put is the prompt)."""

    def __init__(self):
        self.t: list[float] = []
        self.prompt = True

    def put(self, value) -> None:
        if self.prompt:
            self.prompt = False
        else:
            self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def _decode_steps(start: float, stamps: list[float]) -> list[float]:
    """Decode-step times from per-token timestamps, the first (the prompt's forward) left out."""
    return [b - a for a, b in zip([start, *stamps], stamps)][1:]


def measure_lengths(rounds: int, lengths: list[int]) -> dict:
    """One process. For each L: a prompt of L - WINDOW tokens, then WINDOW + 1 greedy tokens; decode step i
    attends over L - WINDOW + i positions, so the WINDOW steps timed end at L. Ways: GPT-2 through ours and HF
    eager, the project's GPT through ours (KVCache) and a no-cache loop, which recomputes from our first token
    on and must choose our tokens."""
    from transformers.generation.streamers import BaseStreamer

    streamer_cls = type("Stamps", (_Stamps, BaseStreamer), {})
    hf, ours = _gpt2(), zero_all.init_inference(_gpt2(), dtype=torch.float32)
    torch.manual_seed(0)
    gpt = zero_all.init_inference(GPT(GPT_CONFIG), dtype=torch.float32)
    prompts = {L: _prompt(HF_CONFIG["vocab_size"], L - WINDOW) for L in lengths}
    gpt_tokens = {L: gpt.generate(prompts[L], max_new_tokens=WINDOW + 1) for L in lengths}

    def run_ours(engine, L):
        stamps: list[float] = []
        start = time.perf_counter()
        engine.generate(prompts[L], max_new_tokens=WINDOW + 1, on_token=lambda i: stamps.append(time.perf_counter()))
        return statistics.median(_decode_steps(start, stamps))

    def run_hf(L):
        s = streamer_cls()
        start = time.perf_counter()
        _hf_generate(hf, prompts[L], WINDOW + 1, streamer=s)
        if len(s.t) != WINDOW + 1:
            raise RuntimeError(f"HF generate streamed {len(s.t)} tokens, expected {WINDOW + 1}")
        return statistics.median(_decode_steps(start, s.t))

    @torch.inference_mode()
    def run_recompute(L):
        seq, steps = gpt_tokens[L][:, :L - WINDOW + 1], []
        for _ in range(WINDOW):
            start = time.perf_counter()
            nxt = gpt.module(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            steps.append(time.perf_counter() - start)
        return statistics.median(steps), torch.equal(seq, gpt_tokens[L])

    ways = {"ours": lambda L: run_ours(ours, L), "hf": run_hf, "gpt-kv": lambda L: run_ours(gpt, L),
            "gpt-recompute": lambda L: run_recompute(L)[0]}
    same = all(run_recompute(L)[1] for L in lengths)  # also warms every way up
    for way in ways.values():
        way(lengths[0])
    at: dict[str, dict[int, list[float]]] = {w: {L: [] for L in lengths} for w in ways}
    for r in range(rounds):
        for k, L in enumerate(lengths if r % 2 == 0 else lengths[::-1]):
            for w in list(ways) if (r + k) % 2 == 0 else list(ways)[::-1]:
                at[w][L].append(ways[w](L))
    cache_bytes = {}  # bytes per token of the project GPT's cache at two capacities: the same figure means flat
    for max_len in (max(lengths), GPT_CONFIG.block_size):
        cache = zero_pipe.KVCache(max_len)
        with torch.inference_mode():
            gpt.module(prompts[lengths[0]], kv_cache=cache)
        cache_bytes[max_len] = cache.nbytes() / max_len
    return {"at": {w: {str(L): v for L, v in by.items()} for w, by in at.items()},
            "kv_bytes_per_token": cache_bytes, "recompute_tokens_match": bool(same)}


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(lengths, seq, spread, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], (("ours", "zero engine (HF DynamicCache)", "C0"), ("hf", "HF eager generate", "C1"))),
              (axes[1], (("gpt-kv", "zero engine (zero_pipe.KVCache)", "C0"),
                         ("gpt-recompute", "no cache: full recompute", "C3"))))
    for ax, ways in panels:
        for w, label, color in ways:
            ys = [1e3 * seq[w][L] for L in lengths]
            lo = [y - 1e3 * spread[w][L][0] for y, L in zip(ys, lengths)]
            hi = [1e3 * spread[w][L][1] - y for y, L in zip(ys, lengths)]
            ax.errorbar(lengths, ys, yerr=[lo, hi], fmt="o-", color=color, capsize=3, label=label)
        ax.set_xlabel("sequence length (positions the decode step attends over)")
        ax.set_ylabel("time per token (ms)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)
    axes[0].set_title("HF GPT-2 (4 x 256, random init), fp32, tp 1")
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set_title("project GPT (examples/gpt.py, 4 x 256), fp32")
    fig.suptitle("greedy decode on CPU, 1 thread: median over rounds, bars from lower to upper quartile", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, tokens and lengths (~1-2 minutes)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rounds = args.rounds or (4 if args.quick else 7)
    new = args.new_tokens or (32 if args.quick else 128)
    lengths = [64, 128] if args.quick else [64, 128, 256, 512]
    began = time.perf_counter()
    print(f"HF GPT-2 {HF_CONFIG}, prompt {PROMPT}, {new} greedy tokens, {rounds} rounds, 1 thread per process; "
          f"goal: ratio >= 1.0 vs HF eager at tp 1 fp32", flush=True)
    tput = run_ranks(measure_throughput, 2, rounds, new, timeout=3600, collective_timeout=1800)[0]
    rows = []
    for weights, tp in CASES:
        key = f"{weights}-tp{tp}"
        t, base = statistics.median(tput["times"][key]), statistics.median(tput["hf_paired"][key])
        goal = GOALS.get((weights, tp))
        ratio = statistics.median(tput["pair_ratios"][key])
        rows.append({"case": key, "weights": weights, "tp_size": tp, "ours_s": t, "hf_s": base,
                     "ours_tok_s": new / t, "hf_tok_s": new / base, "ratio": ratio, "goal": goal,
                     "met": None if goal is None else ratio >= goal, "token_agreement": tput["agreement"][key],
                     "samples_s": tput["times"][key], "hf_samples_s": tput["hf_paired"][key],
                     "pair_ratios": tput["pair_ratios"][key]})
        print(f"  {key:<10} ours {new / t:7.1f} tok/s  HF eager {new / base:7.1f} tok/s  ratio {ratio:5.2f}"
              f"  tokens agree {100 * tput['agreement'][key]:5.1f}%", flush=True)
    sane = tput["agreement"]["fp32-tp1"] == 1.0
    print(f"sanity: fp32 tp 1 tokens {'equal' if sane else 'DIFFER FROM'} HF generate's "
          f"(tp 2: {100 * tput['agreement']['fp32-tp2']:.1f}% equal)", flush=True)
    print(f"time per token at lengths {lengths}, {rounds} rounds ...", flush=True)
    res = run_ranks(measure_lengths, 1, rounds, lengths, timeout=3600)[0]
    seq = {w: {L: statistics.median(by[str(L)]) for L in lengths} for w, by in res["at"].items()}
    spread = {w: {L: _quartiles(by[str(L)]) for L in lengths} for w, by in res["at"].items()}
    seq_ratio = {L: statistics.median(h / o for h, o in zip(res["at"]["hf"][str(L)], res["at"]["ours"][str(L)]))
                 for L in lengths}
    for L in lengths:
        print(f"  L={L:<4} ours {1e3 * seq['ours'][L]:6.2f} ms  HF eager {1e3 * seq['hf'][L]:6.2f} ms  "
              f"GPT KVCache {1e3 * seq['gpt-kv'][L]:6.2f} ms  recompute {1e3 * seq['gpt-recompute'][L]:7.2f} ms",
              flush=True)
    slopes = {w: 1e6 * _slope(lengths, [seq[w][L] for L in lengths]) for w in seq}  # us per position
    growth = {w: seq[w][lengths[-1]] / seq[w][lengths[0]] for w in seq}
    kv = res["kv_bytes_per_token"]
    flat = len(set(kv.values())) == 1
    elapsed = time.perf_counter() - began

    goal_row = rows[0]
    md = ["| case | ours tok/s | HF eager tok/s | ratio | goal | ours ms/token | HF ms/token |",
          "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        status = "—" if r["goal"] is None else f"≥ {r['goal']:.1f} {'met' if r['met'] else 'MISSED'}"
        md.append(f"| {r['weights']} tp {r['tp_size']} | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
                  f"{r['ratio']:.2f} | {status} | {1e3 * r['ours_s'] / new:.2f} | {1e3 * r['hf_s'] / new:.2f} |")
    md += ["", "| sequence length | ours ms/token | HF eager ms/token | ratio | GPT KVCache ms/token "
               "| GPT recompute ms/token |", "|---:|---:|---:|---:|---:|---:|"]
    for L in lengths:
        md.append(f"| {L} | {1e3 * seq['ours'][L]:.2f} | {1e3 * seq['hf'][L]:.2f} | "
                  f"{seq_ratio[L]:.2f} | {1e3 * seq['gpt-kv'][L]:.2f} | "
                  f"{1e3 * seq['gpt-recompute'][L]:.2f} |")
    md.append(f"| slope (µs/position) | {slopes['ours']:.2f} | {slopes['hf']:.2f} | | {slopes['gpt-kv']:.2f} | "
              f"{slopes['gpt-recompute']:.2f} |")
    md += ["", f"KV cache (zero_pipe.KVCache, project GPT fp32): {int(kv[max(kv)])} bytes per token at every "
               f"capacity ({', '.join(str(k) for k in kv)} positions){'' if flat else ' -- NOT constant'}; "
               f"int8 weights {tput['int8_ratio']:.3f}x fp32 bytes."]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"hf_config": HF_CONFIG, "gpt_config": vars(GPT_CONFIG), "prompt": PROMPT, "new_tokens": new,
            "rounds": rounds, "lengths": lengths, "window": WINDOW, "threads_per_process": 1, "quick": args.quick,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "machine": platform.machine(), "python": sys.version.split()[0], "elapsed_s": elapsed,
            "goal": "ours tokens/s / HF eager tokens/s >= 1.0 at tp_size 1, fp32, CPU",
            "within_goal": goal_row["met"], "fp32_tp1_tokens_equal_hf": sane,
            "gpt_recompute_tokens_equal_ours": res["recompute_tokens_match"]}
    payload = {"meta": meta, "throughput": rows,
               "goals": [record_goal("fp32 tp 1 tokens/s / HF eager generate", goal_row["ratio"], 1.0, "higher")],
               "time_per_token_s": {w: {str(L): v for L, v in s.items()} for w, s in seq.items()},
               "ratio_by_length": {str(L): v for L, v in seq_ratio.items()},
               "slope_us_per_position": slopes, "growth_last_over_first": growth,
               "kv_bytes_per_token": {str(k): v for k, v in kv.items()}, "samples_s": res["at"],
               "markdown": "\n".join(md)}
    (args.out / "inference.json").write_text(json.dumps(payload, indent=1))
    plot(lengths, seq, spread, args.out / "inference.png")
    print()
    print("\n".join(md))
    print()
    print(f"goal (ratio >= 1.0 vs HF eager, tp 1 fp32, CPU): {goal_row['ratio']:.2f} -> "
          f"{'met' if goal_row['met'] else 'MISSED'}; GPT recompute tokens "
          f"{'equal' if res['recompute_tokens_match'] else 'DIFFER FROM'} ours; {elapsed:.0f} s")
    print(f"wrote {args.out / 'inference.json'} and {args.out / 'inference.png'}")
    return 0 if sane and res["recompute_tokens_match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
