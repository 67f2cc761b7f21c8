"""Data-parallel scoring under torchrun (gloo, CPU): the book of N ranks equals one process's."""
import os
import subprocess
import sys

import pytest
import torch

import fair_pruner as fp

from helpers import tiny_lm, token_batches
from test_cli import lm_dir  # noqa: F401  (fixture: a tiny saved Llama with texts)

pytest.importorskip("transformers")
WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(n, *args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           str(n), "--master_port", str(free_port()),
                           WORKER, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_thread(work):
    """``work()`` on 1 thread like each rank: a kernel's summation order may depend on the thread
    count (1e-9 differences in MoE expert outputs and CNN U-Scores seen on one machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return work()
    finally:
        torch.set_num_threads(threads)


def single(model_type, n=7):
    """The one-process book (1 thread)."""
    return one_thread(lambda: fp.score(tiny_lm(model_type), token_batches(n=n), classes=8,
                                       samples_per_class=8, projections=16, progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("model_type,n,shard", [
    ("llama", 2, "none"), ("llama", 3, "none"), ("qwen2_moe", 2, "none"),
    ("llama", 2, "fsdp"), ("llama", 3, "fsdp"), ("qwen2_moe", 2, "fsdp"), ("llama", 2, "offload"),
    ("llama", 2, "fsdp-ckpt"), ("qwen2_moe", 2, "fsdp-ckpt")])
def test_ranks_give_the_single_process_book(model_type, n, shard, tmp_path):
    """Data parallel, and FSDP2-sharded (each rank holds 1/n of the parameters): the book of the
    unsharded model on the union of the shards, in one process."""
    out = tmp_path / "book.safetensors"
    r = torchrun(n, "--model", model_type, "--out", str(out), "--shard", shard)
    assert r.returncode == 0, r.stderr[-4000:]
    got, want = fp.ScoreBook.load(out), single(model_type, 7 if shard == "none" else 6)
    if shard != "none":
        import json
        for rank in range(n):
            info = json.loads((tmp_path / f"book.safetensors.rank{rank}.json").read_text())
            # FSDP2 pads dim 0 to a multiple of n: at most one row per parameter more than 1/n
            assert info["local_bytes"] <= info["full_bytes"] / n * 1.1, info
            assert "FSDP2-sharded" in info["prune_refused"], info
    assert got.meta["world_size"] == n and want.meta["world_size"] == 1
    assert got.meta["fingerprint"] == want.meta["fingerprint"]    # the unsharded model's
    for k in ("classes", "class_counts", "calibration_tokens", "batches", "seq_len"):
        assert got.meta[k] == want.meta[k], k
    assert [g.name for g in got.groups] == [g.name for g in want.groups]
    for a, b in zip(got.groups, want.groups):
        torch.testing.assert_close(a.u, b.u, rtol=0, atol=0)          # the same samples
        for s in b.signals:
            torch.testing.assert_close(a.signals[s], b.signals[s], rtol=1e-6, atol=1e-9)
        for k in b.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-5, atol=1e-5)
    for kw in ({"params": 0.3}, {"tod": 0.2}):
        assert fp.allocate(got, **kw).removed == fp.allocate(want, **kw).removed


@pytest.mark.slow
@pytest.mark.parametrize("model_type,n,shard", [("llama", 2, "fsdp"), ("llama", 3, "offload"),
                                                 ("qwen2_moe", 2, "fsdp")])
def test_load_sharded_reads_only_each_ranks_rows_and_gives_the_same_book(model_type, n, shard,
                                                                         tmp_path):
    """fp.llm.load_sharded builds the model on meta, shards it, reads each rank's rows from the
    safetensors file: the book equals the one-process book of the model loaded whole."""
    m = tiny_lm(model_type)
    m.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "book.safetensors"
    r = torchrun(n, "--model", model_type, "--out", str(out), "--shard", shard,
                 "--load-sharded", str(tmp_path / "ckpt"))
    assert r.returncode == 0, r.stderr[-4000:]
    import json
    for rank in range(n):
        info = json.loads((tmp_path / f"book.safetensors.rank{rank}.json").read_text())
        assert info["local_bytes"] <= info["full_bytes"] / n * 1.1, info
    got, want = fp.ScoreBook.load(out), single(model_type, 6)
    assert got.meta["fingerprint"] == want.meta["fingerprint"]
    for a, b in zip(got.groups, want.groups):
        torch.testing.assert_close(a.u, b.u, rtol=0, atol=0)
        for s in b.signals:
            torch.testing.assert_close(a.signals[s], b.signals[s], rtol=1e-6, atol=1e-9)
    assert fp.allocate(got, params=0.3).removed == fp.allocate(want, params=0.3).removed


def test_load_sharded_needs_a_process_group(tmp_path):
    with pytest.raises(fp.FairPrunerError, match="process group"):
        fp.llm.load_sharded(tmp_path)


@pytest.mark.slow
def test_a_sharded_model_with_unequal_shards_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "book.safetensors"
    r = torchrun(2, "--out", str(out), "--shard", "fsdp", "--batches", "7", timeout=200)
    assert r.returncode != 0 and not out.exists()
    for rank in range(2):
        msg = (tmp_path / f"book.safetensors.rank{rank}.err").read_text()
        assert "same number of batches on every rank, got [4, 3]" in msg, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "cnn"])
def test_a_rank_without_batches_is_a_clear_error_on_every_rank(model, tmp_path):
    out = tmp_path / "book.safetensors"
    r = torchrun(2, "--model", model, "--out", str(out), "--batches", "1", timeout=200)
    assert r.returncode != 0 and not out.exists()
    for rank in range(2):
        msg = (tmp_path / f"book.safetensors.rank{rank}.err").read_text()
        assert "rank 1 of 2 has no calibration batches" in msg, r.stderr[-3000:]


def test_shard_needs_a_process_group_and_the_fsdp_helpers_are_no_ops_on_a_plain_model():
    with pytest.raises(fp.FairPrunerError, match="process group"):
        fp.llm.shard(tiny_lm("llama"))
    from fair_pruner import distributed
    model = tiny_lm("llama")
    assert not distributed.is_sharded(model)
    assert distributed.plain_type(model) is type(model)
    assert distributed.fsdp_units(model) == []
    with distributed.full_params(model):        # a no-op without FSDP2
        pass


@pytest.mark.slow
def test_a_failing_rank_makes_every_rank_raise(tmp_path):
    out = tmp_path / "book.safetensors"
    r = torchrun(2, "--out", str(out), "--bad-rank", "1", timeout=200)
    assert r.returncode != 0 and not out.exists()
    errs = {p: (tmp_path / p).read_text() for p in os.listdir(tmp_path) if p.endswith(".err")}
    assert set(errs) == {"book.safetensors.rank0.err", "book.safetensors.rank1.err"}, r.stderr[-3000:]
    assert "rank 1 of 2 failed" in errs["book.safetensors.rank0.err"]
    assert "token ids" in errs["book.safetensors.rank1.err"]


@pytest.mark.slow
@pytest.mark.parametrize("n,budget", [(2, 4 << 30), (3, 4 << 30), (2, 4000)])
def test_cnn_ranks_give_the_single_process_book(n, budget, tmp_path):
    """Also with a memory_budget that forces extra U passes (each summed over the ranks)."""
    from helpers import cnn_case
    out = tmp_path / "book.safetensors"
    r = torchrun(n, "--model", "cnn", "--out", str(out), "--budget", str(budget))
    assert r.returncode == 0, r.stderr[-4000:]
    model, loader, kw = cnn_case(budget)
    got, want = fp.ScoreBook.load(out), one_thread(lambda: fp.score(model, loader, **kw))
    assert got.meta["world_size"] == n and got.meta["u_passes"] == want.meta["u_passes"]
    if budget < 1 << 20:
        assert want.meta["u_passes"] > 1
    for k in ("classes", "class_counts", "calibration_samples", "batches", "labels_found"):
        assert got.meta[k] == want.meta[k], k
    for a, b in zip(got.groups, want.groups):
        assert a.name == b.name
        torch.testing.assert_close(a.u, b.u, rtol=0, atol=0)
        for s in b.signals:
            torch.testing.assert_close(a.signals[s], b.signals[s], rtol=1e-6, atol=1e-9)
        assert a.tensors.keys() == b.tensors.keys()
        for k in b.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-5, atol=1e-5)
    assert fp.allocate(got, params=0.4).removed == fp.allocate(want, params=0.4).removed


def prune_lm_one_and_two_ranks(lm_dir, tmp_path, *two_only):
    """prune-lm of the tiny Llama in this process into tmp_path/one and under torchrun on 2
    ranks (with ``two_only`` options) into tmp_path/two."""
    from fair_pruner.cli import main
    args = ["prune-lm", str(lm_dir / "model"), "--calib-text", str(lm_dir / "calib.txt"),
            "--seq-len", "32", "--num-seqs", "8", "--params", "0.3", "-q"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "-m", "fair_pruner"]
                       + args + ["--out", str(tmp_path / "two"), *two_only],
                       capture_output=True, text=True, env=env, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_prune_lm_under_torchrun_writes_the_single_process_result(lm_dir, tmp_path):
    prune_lm_one_and_two_ranks(lm_dir, tmp_path)
    one = fp.ScoreBook.load(tmp_path / "one" / "score_book.safetensors")
    two = fp.ScoreBook.load(tmp_path / "two" / "score_book.safetensors")
    assert two.meta["world_size"] == 2
    for a, b in zip(one.groups, two.groups):
        torch.testing.assert_close(a.u, b.u, rtol=0, atol=0)
    plan1 = fp.Plan.load(tmp_path / "one" / "fair_pruner_plan.json")
    plan2 = fp.Plan.load(tmp_path / "two" / "fair_pruner_plan.json")
    assert plan1.removed == plan2.removed


@pytest.mark.slow
def test_prune_lm_fsdp_never_holds_the_whole_model_and_writes_the_same_model(lm_dir, tmp_path):
    """torchrun ... prune-lm --fsdp: sharded loading and scoring, then rank 0 prunes the checkpoint
    layer by layer; the result equals the one-process prune-lm's."""
    prune_lm_one_and_two_ranks(lm_dir, tmp_path, "--fsdp")
    plan1 = fp.Plan.load(tmp_path / "one" / "fair_pruner_plan.json")
    plan2 = fp.Plan.load(tmp_path / "two" / "fair_pruner_plan.json")
    assert plan1.removed == plan2.removed
    assert (tmp_path / "two" / "model.safetensors.index.json").exists()    # written by layers
    x = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = fp.from_pretrained(tmp_path / "one")(input_ids=x).logits.float()
        b = fp.from_pretrained(tmp_path / "two")(input_ids=x).logits.float()
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_prune_lm_fsdp_needs_torchrun(lm_dir, tmp_path, capsys):
    from fair_pruner.cli import main
    assert main(["prune-lm", str(lm_dir / "model"), "--calib-text", str(lm_dir / "calib.txt"),
                 "--out", str(tmp_path / "o"), "--fsdp", "-q"]) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_u_owners_balance_the_samples_and_agree_for_the_same_costs():
    """Largest first onto the least-loaded rank: every rank gets work, no rank more than the
    largest tap above another, and the assignment is a function of the costs alone."""
    from fair_pruner.distributed import u_owners
    costs = [1536 * 64 * 32, 3 * 64 * 32 * 64] * 30 + [0, 7]
    for size in (1, 2, 3, 8):
        owners = u_owners(costs, size)
        assert owners == u_owners(list(costs), size) and set(owners) == set(range(size))
        load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(size)]
        assert max(load) - min(load) <= max(costs)
    assert u_owners([5, 5, 5], 2) == [0, 1, 0] and u_owners([], 3) == []


def test_finish_u_all_computes_each_u_score_once_across_the_ranks(monkeypatch):
    """Data parallel, a tap's U-Score is computed only by the rank it was summed onto
    (``u_rank``); the others take it from the gather and drop their samples. Here rank 1 of 2,
    with rank 0's results faked by the single-process values."""
    from fair_pruner import engine
    from fair_pruner.engine import Reservoir, SketchTap, finish_u_all
    torch.manual_seed(0)
    res = Reservoir([0, 1, 2], 4, 0)
    for i in range(12):
        res.offer([i % 3], i)
    taps, want = [], []
    for i in range(4):
        t = SketchTap(f"t{i}")
        t.buf = torch.randn(3, 4, 5 + i, 2)
        t.filled = torch.ones(3, 4, dtype=torch.bool)
        taps.append(t)
        ref = SketchTap(t.name)
        ref.buf, ref.filled = t.buf.clone(), t.filled.clone()
        engine.finish_u(ref, res, [0, 1, 2])
        want.append(ref.u)
    for t, r in zip(taps, [0, 1, 1, 0]):
        t.u_rank = r
    done = []
    real = engine.finish_u
    monkeypatch.setattr(engine, "world", lambda: (1, 2))
    monkeypatch.setattr(engine, "finish_u", lambda p, *a: (done.append(p.name), real(p, *a)))
    monkeypatch.setattr(engine, "gathered", lambda work: [{0: want[0], 3: want[3]}, work()])
    finish_u_all(taps, res, [0, 1, 2])
    assert done == ["t1", "t2"]
    for t, u in zip(taps, want):
        assert torch.equal(t.u, u) and t.buf is None and t.filled is None
