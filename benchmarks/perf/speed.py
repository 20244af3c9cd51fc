"""Training and evaluation speed, vaelab against the tutorial's pipeline, in one process.

    python -m benchmarks.perf.speed             # everything (about 6 minutes on 2 cores)
    python -m benchmarks.perf.speed --reps 5 --eval-images 1000

Measures, alternating over repetitions so that a noisy machine hurts all alike:
  notebook   the tutorial notebook's loop as it is written, rewritten here for the benchmark:
             a Dataset that turns one image at a time into a float tensor, shuffling
             DataLoaders whose 8 worker processes start afresh every epoch, the notebook's
             model (sigmoid output, BCE on probabilities), a progress bar, each step's loss
             read back to the host, and manual SGD
  lean       the same loop as a careful user would tune it: persistent workers, no per-step
             read-back, no bar (on a GPU also pinned memory)
  vaelab     vaelab's trainer on the same recipe (z=2, batch 100, SGD lr 5e-3)
  floor      the same GEMMs alone (forward, weight and input gradients, test pass)
Each "epoch" is one pass over the 60,000 training images plus the loss of the
10,000 test images, as the tutorial does it. Then, once: importance-sampled
evaluation (K=5000) and its floor (the decoder's GEMMs alone), and optionally the
wall time of a whole default `vaelab train`.

Writes benchmarks/results/speed.json and speed.md. Prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

import vaelab
from vaelab.sampling import importance_sampled, resolve_precision

from benchmarks.lib.machine import RESULTS, cpu_description, write_results

BATCH, LR, Z = 100, 5e-3, 2


# --- peak memory ------------------------------------------------------------------

class PeakRSS:
    """Samples this process's resident memory every 10 ms; `.peak` in bytes."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


# --- the tutorial's pipeline (baseline) -------------------------------------------

class PerImageDataset(TorchDataset):
    """What the tutorial's torchvision MNIST with ToTensor() does per item: a PIL
    image, then a (1, 28, 28) float tensor in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images.reshape(-1, 28, 28)
        self.labels = labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i].numpy(), mode="L")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        return pixels.unsqueeze(0).float().div(255), int(self.labels[i])


class TutorialVAE(nn.Module):
    """The notebook's network: separate mean and log-variance heads, sigmoid output."""

    def __init__(self, z_dim: int = Z):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.mu = nn.Linear(128, z_dim)
        self.logvar = nn.Linear(128, z_dim)
        self.decoder = nn.Sequential(nn.Linear(z_dim, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(),
                                     nn.Linear(256, 784), nn.Sigmoid())

    def forward(self, x):
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decoder(z), mu, logvar


def tutorial_loss(recon, x, mu, logvar):
    bce = nn.functional.binary_cross_entropy(recon, x, reduction="sum")
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
    return (bce + kl) / len(x)


def tutorial_loaders(data, workers: int, lean: bool, pin: bool = False) -> tuple[DataLoader, DataLoader]:
    """The notebook's train and test DataLoaders: batches of 100, both shuffled, the last partial
    batch dropped, `workers` processes started afresh for every pass. lean: persistent workers
    (and pinned memory with pin), the test set in order."""
    make = lambda images, labels, shuffle: DataLoader(
        PerImageDataset(images, labels), batch_size=BATCH, shuffle=shuffle, num_workers=workers, drop_last=True,
        persistent_workers=lean and workers > 0, pin_memory=pin)
    return make(data.train_images, data.train_labels, True), make(data.test_images, data.test_labels, not lean)


def baseline_epoch(model, train_loader, test_loader, device: str = "cpu", as_written: bool = True) -> float:
    """One epoch of the tutorial's loop; returns the mean test loss. as_written: with the
    notebook's progress bar and its running training loss, read back to the host every step
    (on a GPU a synchronisation per step); else without either."""
    model.train()
    train_loss, n_train = 0.0, len(train_loader.dataset)
    with open(os.devnull, "w") as screen:
        for data, _ in tqdm(train_loader, total=len(train_loader), leave=False, file=screen, disable=not as_written):
            x = torch.bernoulli(data.to(device)).view(len(data), -1)
            recon, mu, logvar = model(x)
            loss = tutorial_loss(recon, x, mu, logvar)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad
            if as_written:
                train_loss += loss.detach().item() * len(x) / n_train
    model.eval()
    total = 0.0
    with torch.no_grad():
        for data, _ in test_loader:
            x = torch.bernoulli(data.to(device)).view(len(data), -1)
            recon, mu, logvar = model(x)
            total += tutorial_loss(recon, x, mu, logvar).item() * len(x)
    return total / len(test_loader.dataset)


# --- the GEMM floor ----------------------------------------------------------------

def gemm_floor_epoch(n_train: int, n_test: int) -> float:
    """Seconds for the GEMMs of one epoch alone (tutorial shapes, fp32)."""
    layers = [(784, 256), (256, 128), (128, 2 * Z), (Z, 128), (128, 256), (256, 784)]
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(o, i, generator=g) * 0.05 for i, o in layers]
    A = [torch.randn(BATCH, i, generator=g) for i, _ in layers]    # layer inputs
    dY = [torch.randn(BATCH, o, generator=g) for _, o in layers]   # output gradients
    test_A = [torch.randn(1000, i, generator=g) for i, _ in layers]
    start = time.perf_counter()
    for _ in range(n_train // BATCH):
        for j in range(len(layers)):
            torch.mm(A[j], W[j].t())                   # forward
            torch.mm(dY[j].t(), A[j])                  # weight gradient
            if j != 0:
                torch.mm(dY[j], W[j])                  # input gradient (not for the data)
    for _ in range(n_test // 1000):
        for j in range(len(layers)):
            torch.mm(test_A[j], W[j].t())
    return time.perf_counter() - start


def decoder_gemm_floor(model, n_rows: int, precision: str, rows_per_chunk: int = 2500) -> float:
    """Seconds for the decoder's GEMMs alone over n_rows latent samples."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    weights = [m.weight.detach().to(dtype).t().contiguous() for m in model.decoder if isinstance(m, nn.Linear)]
    inputs = [torch.randn(rows_per_chunk, w.shape[0]).to(dtype) for w in weights]
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        for a, w in zip(inputs, weights):
            torch.mm(a, w)
    return (time.perf_counter() - start) / reps * n_rows / rows_per_chunk


# --- running it -----------------------------------------------------------------------

def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def machine() -> dict:
    return {"cpu": cpu_description(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions of each epoch")
    parser.add_argument("--workers", type=int, default=8,
                        help="DataLoader workers of the baseline (default: the tutorial's 8)")
    parser.add_argument("--eval-images", type=int, default=10000, help="test images for the K=5000 evaluation")
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--train-run", action="store_true", help="also time whole default `vaelab train` runs")
    parser.add_argument("--train-runs", type=int, default=3, help="how many (the median is reported)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    data = vaelab.load_data(progress=False)
    n_train, n_test = len(data.train_images), len(data.test_images)
    loaders = {"notebook": tutorial_loaders(data, args.workers, lean=False),
               "lean": tutorial_loaders(data, args.workers, lean=True)}

    times = {"notebook": [], "lean": [], "vaelab": [], "floor": []}
    peaks = {"notebook": 0, "lean": 0, "vaelab": 0}
    losses = {"notebook": None, "lean": None, "vaelab": None}
    configs = {"vaelab": vaelab.RunConfig(epochs=1, device="cpu")}
    for rep in range(args.reps):
        for key, (train_loader, test_loader) in loaders.items():
            torch.manual_seed(0)
            baseline_model = TutorialVAE()  # fresh each rep: every rep times (and scores) a first epoch
            with PeakRSS() as mem:
                t = time.perf_counter()
                losses[key] = baseline_epoch(baseline_model, train_loader, test_loader, as_written=key == "notebook")
                times[key].append(time.perf_counter() - t)
            peaks[key] = max(peaks[key], mem.peak)
        for key, config in configs.items():
            with PeakRSS() as mem:
                result = vaelab.train(config, data=data, progress=False)
                times[key].append(result.metrics[0]["seconds"])
                losses[key] = result.metrics[0]["test_loss"]
            peaks[key] = max(peaks[key], mem.peak)
        times["floor"].append(gemm_floor_epoch(n_train, n_test))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)

    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "machine": machine(),
        "epoch_seconds": {k: summary(v) for k, v in times.items()},
        "images_per_second": {k: n_train / med[k] for k in ("notebook", "lean", "vaelab")},
        "ratio_to_gemm_floor": med["vaelab"] / med["floor"],
        # each repetition's own ratio (all measured back to back): slow drift of the VM cancels
        "paired_ratios": {
            "speedup_vs_notebook": statistics.median(b / v for b, v in zip(times["notebook"], times["vaelab"])),
            "speedup_vs_lean": statistics.median(b / v for b, v in zip(times["lean"], times["vaelab"])),
            "ratio_to_gemm_floor": statistics.median(v / f for v, f in zip(times["vaelab"], times["floor"]))},
        "peak_rss_bytes": peaks,
        "first_epoch_test_loss": losses,
        "baseline_workers": args.workers,
        "note": "the baseline's DataLoader workers are separate processes, not in its peak RSS",
    }

    if not args.skip_eval:
        model = result.model
        precision = resolve_precision("auto", torch.device("cpu"))
        images = data.test_images[:args.eval_images]
        with PeakRSS() as mem:
            t = time.perf_counter()
            r = importance_sampled(model, images, k=args.k, precision=precision, progress=False)
            seconds = time.perf_counter() - t
        floor = decoder_gemm_floor(model, len(images) * args.k, precision)
        report["evaluation"] = {"k": args.k, "images": len(images), "precision": precision, "seconds": seconds,
                                "decoder_gemm_floor_seconds": floor, "ratio_to_floor": seconds / floor,
                                "peak_rss_bytes": mem.peak, "nll": r["nll"],
                                "note": "model: one epoch of the tutorial recipe"}

    if args.train_run:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            walls = []
            for _ in range(args.train_runs):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "vaelab", "train", "--quiet", "--device", "cpu",
                                "--out", f"{tmp}/run{len(walls)}"], check=True, stdout=subprocess.DEVNULL)
                walls.append(time.perf_counter() - t)
            report["default_train_wall_seconds"] = statistics.median(walls)
            report["default_train_wall_all"] = walls
            report["default_train_test_loss"] = json.loads(
                Path(f"{tmp}/run0/metrics.jsonl").read_text().splitlines()[-1])["test_loss"]

    write_results(args.out, "speed", report, markdown(report))
    return 0


def markdown(r: dict) -> str:
    e = r["epoch_seconds"]
    m = r["machine"]
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    rows = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, PyTorch {m['torch']}. "
        f"Baseline DataLoader workers: {r['baseline_workers']}.",
        "",
        "| one epoch (60k train + 10k test images) | median s | min s | max s | images/s | peak RSS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = {"notebook": "tutorial notebook's loop as written (per-image Dataset, fresh DataLoader workers "
                         "each epoch, progress bar, per-step loss read-back, manual SGD)",
             "lean": "the same loop, lean (persistent workers, no per-step read-back or bar)",
             "vaelab": "vaelab trainer (same recipe)",
             "floor": "GEMM floor (the same matrix products alone)"}
    for key, name in names.items():
        if key not in e:
            continue
        s = e[key]
        ips = f"{r['images_per_second'][key]:,.0f}" if key in r["images_per_second"] else ""
        peak = mib(r["peak_rss_bytes"][key]) if key in r["peak_rss_bytes"] else ""
        rows.append(f"| {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | {ips} | {peak} |")
    p = r["paired_ratios"]
    rows += ["", f"vaelab per epoch against the notebook's loop as written: {p['speedup_vs_notebook']:.1f}x; "
                 f"against the lean loop: {p['speedup_vs_lean']:.1f}x; its GEMM floor: {p['ratio_to_gemm_floor']:.2f}x "
                 f"(medians of each of {len(e['vaelab']['all'])} alternating repetitions' own ratios)."]
    if "evaluation" in r:
        v = r["evaluation"]
        rows += ["", f"Importance-sampled evaluation, K={v['k']}, {v['images']} test images, {v['precision']}: "
                     f"{v['seconds']:.0f} s, {v['ratio_to_floor']:.2f}x the decoder's GEMM floor "
                     f"({v['decoder_gemm_floor_seconds']:.0f} s); peak RSS {mib(v['peak_rss_bytes'])}."]
    if "default_train_wall_seconds" in r:
        walls = ", ".join(f"{w:.1f}" for w in r.get("default_train_wall_all", []))
        rows += ["", f"A whole default `vaelab train` (20 epochs, figures included): median "
                     f"{r['default_train_wall_seconds']:.1f} s wall ({walls}), test negative ELBO "
                     f"{r['default_train_test_loss']:.2f} nats."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
