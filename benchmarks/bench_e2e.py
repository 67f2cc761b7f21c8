"""End-to-end scoring cost: ``fp.score`` against the passes it rides on and the authors' package.

For each model (torchvision ResNet-18 and a VGG-style CNN, 10 classes, 32x32 inputs, random
weights: only time is measured) and samples per class (8, 32), on the same seeded data and the
same thread count (2 unless FAIR_PRUNER_BENCH_THREADS is set):

* floor: one plain forward + backward (loss.backward) per batch over the same batches;
* fair_pruner: ``fp.score(model, loader, samples_per_class=s)``;
* network-pruner 2.16: ``get_metrics(model, loader, the_samplesize_for_compute_distance=s)``,
  run in a child process inside a temporary directory (it writes results.pkl into the CWD)
  with a wall-clock limit; a run that hits the limit is reported as "> limit".

    python benchmarks/bench_e2e.py [--models resnet18,vgg] [--spc 8,32] [--np-limit 900]
        [--no-np] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

THREADS = int(os.environ.get("FAIR_PRUNER_BENCH_THREADS", "2"))
NUM_CLASSES = 10
BATCH = 64


class LabelledTensors(torch.utils.data.TensorDataset):
    """TensorDataset with the ``classes`` / ``targets`` attributes network-pruner looks for."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.targets = y.tolist()
        self.classes = [str(c) for c in range(NUM_CLASSES)]


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision
        return torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    if name == "vgg":
        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        layers = (block(3, 64) + block(64, 64) + [nn.MaxPool2d(2)] + block(64, 128) +
                  block(128, 128) + [nn.MaxPool2d(2)] + block(128, 256) + block(256, 256) +
                  [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256 * 16, 256), nn.ReLU(),
                   nn.Linear(256, NUM_CLASSES)])
        return nn.Sequential(*layers).eval()
    raise ValueError(f"unknown model {name!r}")


def make_data(spc: int) -> LabelledTensors:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(NUM_CLASSES).repeat_interleave(spc)
    y = y[torch.randperm(y.numel(), generator=g)]
    x = torch.randn(y.numel(), 3, 32, 32, generator=g)
    return LabelledTensors(x, y)


def loader_of(ds):
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


def time_floor(model, loader) -> float:
    """Seconds for one forward + backward per batch (the passes scoring rides on)."""
    t0 = time.perf_counter()
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def time_score(model, loader, spc) -> float:
    import fair_pruner as fp
    t0 = time.perf_counter()
    fp.score(model, loader, samples_per_class=spc, progress=False)
    return time.perf_counter() - t0


def time_network_pruner(model_name: str, spc: int, limit: float, layers: int):
    """(seconds, layers timed, prunable layers) for network-pruner's get_metrics in a child
    process, or None past ``limit``. With ``layers`` > 0 only that many prunable layers, evenly
    spread, are scored (get_metrics scores layer by layer, one loader pass each), and the caller
    extrapolates linearly to all of them."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--child-np", model_name, str(spc),
               str(layers)]
        try:
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return None
        if res.returncode != 0:
            raise RuntimeError(f"network-pruner failed:\n{res.stderr[-2000:]}")
        t, k, n = res.stdout.strip().splitlines()[-1].split()
        return float(t), int(k), int(n)


def _child_np(model_name: str, spc: int, layers: int) -> None:
    from Network_Pruner import get_metrics
    from Network_Pruner.FAIR_Pruner import _auto_prunable_layer_indices
    torch.set_num_threads(THREADS)
    model = make_model(model_name)
    loader = loader_of(make_data(spc))
    auto = _auto_prunable_layer_indices(model, exclude_output_layer=True)
    chosen = auto
    if 0 < layers < len(auto):
        chosen = [auto[round(i * (len(auto) - 1) / max(1, layers - 1))] for i in range(layers)]
    t0 = time.perf_counter()
    get_metrics(model, loader, layers2prune=chosen, layers2analysis=chosen,
                device=torch.device("cpu"), the_samplesize_for_compute_distance=spc,
                results_save_path="results.pkl")
    print(f"{time.perf_counter() - t0:.3f} {len(chosen)} {len(auto)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,vgg")
    ap.add_argument("--spc", default="8,32")
    ap.add_argument("--np-limit", type=float, default=900.0, help="seconds per network-pruner run")
    ap.add_argument("--np-layers", type=int, default=0,
                    help="time network-pruner on this many layers and extrapolate (0: all)")
    ap.add_argument("--no-np", action="store_true", help="skip network-pruner")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--child-np", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_np:
        _child_np(a.child_np[0], int(a.child_np[1]), int(a.child_np[2]))
        return 0
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    from fair_pruner import ops
    print(f"# threads={THREADS} torch={torch.__version__} "
          f"unit_stats backend={ops.active_backend('unit_stats', 'cpu')}", flush=True)
    rows = []
    for name in a.models.split(","):
        for spc in (int(s) for s in a.spc.split(",")):
            model, loader = make_model(name), loader_of(make_data(spc))
            time_floor(model, loader)  # warm-up
            floor = min(time_floor(model, loader) for _ in range(a.repeats))
            score = min(time_score(model, loader, spc) for _ in range(a.repeats))
            row = {"model": name, "samples_per_class": spc, "samples": spc * NUM_CLASSES,
                   "floor_s": floor, "score_s": score, "score_over_floor": score / floor}
            np_txt = ""
            if not a.no_np:
                res = time_network_pruner(name, spc, a.np_limit, a.np_layers)
                if res is None:
                    row["network_pruner_s"] = None
                    np_txt = (f"  network-pruner > {a.np_limit:.0f} s (limit; "
                              f"x>{a.np_limit / score:.0f})")
                else:
                    t, k, n = res
                    est = t * n / k
                    row.update(network_pruner_s=est, network_pruner_layers_timed=k,
                               network_pruner_layers=n, network_pruner_measured_s=t,
                               speedup_vs_network_pruner=est / score)
                    how = "" if k == n else f", extrapolated from {k} of {n} layers ({t:.1f} s)"
                    np_txt = f"  network-pruner {est:.1f} s{how} (x{est / score:.0f} slower)"
            rows.append(row)
            print(f"{name:<9} spc={spc:<3} fwd+bwd {floor:.3f} s  fp.score {score:.3f} s "
                  f"(x{score / floor:.2f} of fwd+bwd){np_txt}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
