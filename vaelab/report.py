"""A run as one self-contained HTML page: configuration, metrics, evaluation,
figures, and a latent explorer that decodes in the browser.

The page needs no network: figures are embedded as PNG data, and the decoder's
weights as base64 float32 arrays, run by a few lines of plain JavaScript (dense
layers, and the conv decoder's transposed convolutions). It shows the likelihood's
mean, sigmoid of the first C output channels for every likelihood, in grey or RGB.
For z_dim = 2 the pointer on the latent plane picks z; for larger z_dim, sliders
set the first latent dimensions (the rest stay at 0, the prior's mean).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from .data import Dataset
from .errors import VaelabError
from .fileio import atomic_write_bytes, check_output
from .gap import read_gap
from .models import VAE
from .plots import label_colour, label_legend, latent_means
from .runs import FIGURES, METRICS, PRIOR, load_config, read_eval, read_metrics

PLANE_LIMIT = 4.0      # the explorer's latent plane is [-4, 4]^2, like the manifold figure
SCATTER_POINTS = 2000  # test images drawn on the plane for orientation
MAX_SLIDERS = 8
# A line under a figure whose name does not say what it shows.
CAPTIONS = {
    "interpolation.png": "linear paths between the posterior means of pairs of test images, "
                         "decoded; the two test images at the ends of each row",
    "classes.png": "samples by class: each row decodes draws z ~ p(z|y) under its class y",
}


def _b64_float32(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().cpu().float().contiguous().numpy().tobytes()).decode()


def decoder_spec(model: VAE) -> dict | None:
    """The decoder as JSON (VAE.decoder_layers, each layer's weights as base64 float32), with
    z_dim and the image shape (C, H, W). None for a decoder of your own, which the page cannot
    translate."""
    spec = model.decoder_layers()
    if spec is None:
        return None
    layers = [{**layer, "weight": _b64_float32(layer["weight"]), "bias": _b64_float32(layer["bias"])}
              for layer in spec["layers"]]
    return {"z_dim": model.config.z_dim, "image_shape": list(model.config.image_shape),
            **spec, "layers": layers}


def _hex(colour: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(255 * v):02x}" for v in colour[:3])


def legend_spec(data: Dataset | None) -> dict | None:
    """The explorer's legend: its title and each label's (number, name); the page colours them as the
    plane's points, from the payload's colours (those of the scatter figures)."""
    if data is None or data.test_labels is None:
        return None
    title, names = label_legend(data)
    labels = sorted(set(data.test_labels.tolist()))
    return {"title": title, "entries": [[i, names[i] if names else str(i)] for i in labels]}


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{cells}</table>"


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            text = v if isinstance(v, str) else f"{v:.4f}" if isinstance(v, float) else json.dumps(_rounded(v))
            rows.append((f"{prefix}{k}", text))
    return rows


def _rounded(v):
    """Floats in lists (an evaluation's per-dimension values) to 4 decimals, for reading."""
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return round(v, 4) if isinstance(v, float) else v


def _nats(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f} nats per image"


def _listed(values: list) -> str:
    return ", ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values)


def evaluation_rows(r: dict) -> list[tuple[str, str]]:
    """`vaelab evaluate`'s record (eval.json) as labelled rows for reading; keys this page does
    not know come after them as they are."""
    k, quantity = r.get("k"), r.get("quantity", "log p(x)")
    known = {
        "nll": ((f"test NLL, -{quantity} by importance sampling (K={k})"
                 if r.get("estimate", "importance sampling") == "importance sampling"
                 else "an upper bound on the test NLL (not an estimate)"), _nats),
        "quantity": ("estimated", lambda v: v + (", y each image's label" if "y" in v else "")),
        "nll_se": ("its Monte-Carlo standard error", _nats),
        "nll_se_images": ("its standard error over the test images", _nats),
        "neg_elbo": ("negative ELBO, from the same draws", _nats),
        "bits_per_dim": ("test NLL in bits per dimension", lambda v: f"{v:.4f}"),
        "test_images": ("test images", str),
        "test_set_sha256": ("test images' SHA-256", str),
        "seed": ("seed of the binarization and noise", str),
        "estimator": ("estimator", str),
        "precision": ("decoder precision", str),
        "unit": None,
        "k": None,
        "active_units": ("active units (per stochastic layer)", lambda v: ", ".join(
            f"{a} of {len(d)}" for a, d in zip(v, r.get("latent_variance", [[]] * len(v))))),
        "active_threshold": ("a unit is active where the variance of E_q[z_d] over images exceeds",
                             str),
        "latent_variance": ("variance of E_q[z_d] over test images, d = 0, 1, ...",
                            lambda v: "; ".join(_listed(layer) for layer in v)),
        "posterior_mean": ("E_q[z] taken as", str),
        "kl_per_dim": ("KL(q(z_d|x) || p(z_d)) per dimension d = 0, 1, ... (nats)", _listed),
        "kl_per_dim_note": ("KL per dimension", str),
        "bound": ("the NLL above is the bound under", lambda v: f"the {v} prior"),
        "reconstruction": ("reconstruction term -log p(x|z_q)", _nats),
        "estimate": None,
        "seconds": ("time taken", lambda v: f"{v:.0f} s"),
        "device": ("device", str),
        "processes": ("processes", str),
    }
    rows = []
    for key, value in r.items():
        if key == "iwae":
            rows += [(f"negative IWAE bound, k={j}, from the same draws", _nats(v))
                     for j, v in value.items()]
        elif key in known:
            if known[key] is not None:
                label, text = known[key]
                rows.append((label, text(value)))
        else:
            rows += _flatten({key: value})
    return rows


def gap_rows(r: dict) -> list[tuple[str, str]]:
    """`vaelab gap`'s record (gap.json) as labelled rows; keys this page does not know follow."""
    spread = lambda v: f"{v['mean']:.3f} ± {v['se'] or 0:.3f} nats per image (s.e. over images)"
    known = {
        "images": ("test images", str),
        "k": ("importance samples per image, K", str),
        "seed": ("seed of the binarization and noise", str),
        "log_px": ("log p(x)", spread),
        "elbo_fitted": ("ELBO of the fitted posteriors, L[q*]", spread),
        "elbo_encoder": ("ELBO of the encoder, L[q]", spread),
        "approximation_gap": ("approximation gap, log p(x) - L[q*]", spread),
        "amortization_gap": ("amortization gap, L[q*] - L[q]", spread),
        "proposal": ("proposal of log p(x)", str),
        "precision": ("decoder precision", str),
        "seconds": ("time taken", lambda v: f"{v:.0f} s"),
        "unit": None,
    }
    rows = []
    for key, value in r.items():
        if key in known:
            if known[key] is not None:
                label, text = known[key]
                rows.append((label, text(value)))
        elif key == "fit" and isinstance(value, dict):
            rows += [(f"fit: {name.replace('_', ' ')}", v if isinstance(v, str) else
                      f"{v:.4f}" if isinstance(v, float) else str(v)) for name, v in value.items()]
        else:
            rows += _flatten({key: value})
    return rows


def _metrics_table(metrics: list[dict]) -> str:
    if not metrics:
        return "<p>No finished epoch.</p>"
    keys = list(metrics[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{m[k]:.3f}</td>" if isinstance(m.get(k), float) else f"<td>{m.get(k)}</td>"
                                    for k in keys) + "</tr>" for m in metrics)
    return f"<table class='grid'><tr>{head}</tr>{body}</table>"


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _caption(name: str) -> str:
    """A figure's file name, with what it shows where the name does not say."""
    return f"{name}: {CAPTIONS[name]}" if name in CAPTIONS else name


def _prior_html(run_dir: Path) -> str:
    """The learned prior's epochs (RUN/prior, a VQ-VAE's `vaelab train-prior`), where it has any."""
    metrics = read_metrics(run_dir / PRIOR) if (run_dir / PRIOR / METRICS).is_file() else []
    if not metrics:
        return ""
    return ("<h3>The learned prior over codes (vaelab train-prior), nats per image of codes</h3>"
            + _metrics_table(metrics))


def build_report(run_dir: str | Path, model: VAE, data: Dataset | None = None) -> str:
    """The report's HTML text. With data, the z_dim=2 plane shows test latents."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    metrics = read_metrics(run_dir)
    evaluation = read_eval(run_dir)
    figures = sorted((run_dir / FIGURES).glob("*.png")) if (run_dir / FIGURES).is_dir() else []

    points = []
    if data is not None and model.plane:
        mu = latent_means(model, data, SCATTER_POINTS)
        labels = [-1] * len(mu) if data.test_labels is None else data.test_labels[:len(mu)].tolist()
        points = [[round(float(a), 3), round(float(b), 3), int(c)] for (a, b), c in zip(mu, labels)]

    eval_html = _table(evaluation_rows(evaluation)) if evaluation else \
        "<p>Not evaluated yet: run <code>vaelab evaluate RUN</code>, then the report again.</p>"
    gap = read_gap(run_dir)
    if gap:
        eval_html += ("<h3>Approximation and amortization gaps (vaelab gap)</h3>"
                      + _table(gap_rows(gap)))
    figures_html = "".join(f"<figure><img alt='{html.escape(p.stem)}' src='data:image/png;base64,{_png(p)}'>"
                           f"<figcaption>{html.escape(_caption(p.name))}</figcaption></figure>"
                           for p in figures)
    colours = [_hex(label_colour(i)) for i in range(10)]
    payload = json.dumps({"decoder": decoder_spec(model), "points": points, "limit": PLANE_LIMIT,
                          "sliders": min(model.config.z_dim, MAX_SLIDERS), "colours": colours,
                          "legend": legend_spec(data)})
    return (_PAGE.replace("%TITLE%", html.escape(f"vaelab report: {run_dir.name}"))
            .replace("%CONFIG%", _table(_flatten(config.to_dict())))
            .replace("%METRICS%", _metrics_table(metrics) + _prior_html(run_dir))
            .replace("%EVAL%", eval_html)
            .replace("%FIGURES%", figures_html or "<p>No figures: run <code>vaelab plot RUN</code>.</p>")
            .replace("%PAYLOAD%", payload.replace("<", "\\u003c")))  # no "</script>" or "<!--" in the script


def write_report(run_dir: str | Path, model: VAE, data: Dataset | None = None,
                 out: str | Path | None = None) -> Path:
    """Write the report (default RUN/report.html) and return its path."""
    path = check_output(out, flag="-o") if out else Path(run_dir) / "report.html"
    try:
        atomic_write_bytes(path, build_report(run_dir, model, data).encode())
    except OSError as e:
        raise VaelabError(f"cannot write the report ({e.strerror or e})") from None
    return path


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .9em; } th, td { padding: .2em .6em; text-align: left; }
table.grid td, table.grid th { border: 1px solid #ddd; text-align: right; }
table.kv th { font-weight: normal; color: #555; }
#explorer { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
#controls { max-width: 420px; }
canvas { border: 1px solid #999; image-rendering: pixelated; }
#plane { cursor: crosshair; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { max-width: 520px; }
.slider { display: flex; align-items: center; gap: .5em; margin: .3em 0; }
.key { white-space: nowrap; margin-right: .6em; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .25em; vertical-align: middle; }
</style></head>
<body>
<h1>%TITLE%</h1>

<h2>Latent explorer</h2>
<div id="explorer">
  <div id="controls"></div>
  <div><canvas id="digit" width="280" height="280"></canvas><p id="zlabel"></p></div>
</div>

<h2>Evaluation</h2>
%EVAL%

<h2>Metrics (nats per image)</h2>
%METRICS%

<h2>Figures</h2>
%FIGURES%

<h2>Configuration</h2>
%CONFIG%

<script>
"use strict";
const DATA = %PAYLOAD%;

if (DATA.decoder === null) {
  document.getElementById("controls").textContent =
    "This model's decoder is a module of your own, which the page cannot run: no explorer.";
} else {
  function floats(b64) {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    return new Float32Array(bytes.buffer);
  }
  const layers = DATA.decoder.layers.map(l => ({type: l.type, n_in: l.in, n_out: l.out, w: floats(l.weight), b: floats(l.bias)}));
  const act = {relu: v => Math.max(v, 0), tanh: Math.tanh, elu: v => v > 0 ? v : Math.expm1(v),
               softplus: v => v > 20 ? v : Math.log1p(Math.exp(v))}[DATA.decoder.activation];
  const [C, H, W] = DATA.decoder.image_shape;

  // y = W h + b, h: (n_in), W: (n_out, n_in) row-major.
  function dense(l, h) {
    const out = new Float64Array(l.n_out);
    for (let j = 0; j < l.n_out; j++) {
      let s = l.b[j];
      const row = j * l.n_in;
      for (let i = 0; i < l.n_in; i++) s += l.w[row + i] * h[i];
      out[j] = s;
    }
    return out;
  }

  // A 4x4 transposed convolution, stride 2, padding 1: h (n_in, side, side') -> (n_out, 2 side, 2 side').
  // Each input value adds its weighted kernel into the output, at 2 * position - 1 + kernel offset.
  function deconv(l, h, hh, ww) {
    const oh = 2 * hh, ow = 2 * ww, out = new Float64Array(l.n_out * oh * ow);
    for (let o = 0; o < l.n_out; o++) out.fill(l.b[o], o * oh * ow, (o + 1) * oh * ow);
    for (let i = 0; i < l.n_in; i++)
      for (let y = 0; y < hh; y++)
        for (let x = 0; x < ww; x++) {
          const v = h[(i * hh + y) * ww + x];
          if (v === 0) continue;
          for (let o = 0; o < l.n_out; o++) {
            const k = (i * l.n_out + o) * 16;
            for (let ky = 0; ky < 4; ky++) {
              const oy = 2 * y - 1 + ky;
              if (oy < 0 || oy >= oh) continue;
              for (let kx = 0; kx < 4; kx++) {
                const ox = 2 * x - 1 + kx;
                if (ox >= 0 && ox < ow) out[(o * oh + oy) * ow + ox] += v * l.w[k + 4 * ky + kx];
              }
            }
          }
        }
    return out;
  }

  // The decoder's forward pass, then the likelihood's mean: sigmoid of the first C channels,
  // (C, H, W) values in [0, 1], as vaelab computes it.
  function decode(z) {
    let h = Float64Array.from(z), side = DATA.decoder.start ? DATA.decoder.start.slice(1) : null;
    layers.forEach((l, k) => {
      if (l.type === "dense") h = dense(l, h);
      else { h = deconv(l, h, side[0], side[1]); side = [2 * side[0], 2 * side[1]]; }
      if (k < layers.length - 1) h = h.map(act);
    });
    return h.slice(0, C * H * W).map(v => 1 / (1 + Math.exp(-v)));
  }

  const small = document.createElement("canvas");
  small.width = W; small.height = H;
  const digit = document.getElementById("digit");
  digit.height = Math.round(digit.width * H / W);

  function show(z) {
    const image = decode(z);
    const pixels = small.getContext("2d").createImageData(W, H);
    for (let p = 0; p < H * W; p++) {
      const channel = c => Math.round(255 * image[(C === 1 ? 0 : c) * H * W + p]);
      pixels.data.set([channel(0), channel(1), channel(2), 255], 4 * p);
    }
    small.getContext("2d").putImageData(pixels, 0, 0);
    const ctx = digit.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(small, 0, 0, digit.width, digit.height);
    document.getElementById("zlabel").textContent = "z = (" + Array.from(z, v => v.toFixed(2)).join(", ") + ")";
    window.vaelab = {z: Array.from(z), image: Array.from(image), pixels: small};
  }

  const z = new Float64Array(DATA.decoder.z_dim);
  const controls = document.getElementById("controls");
  if (DATA.decoder.z_dim === 2) {
    const size = 400, lim = DATA.limit;
    const plane = document.createElement("canvas");
    plane.id = "plane"; plane.width = size; plane.height = size;
    controls.appendChild(plane);
    const note = document.createElement("p");
    note.textContent = "Move the pointer over the latent plane [-" + lim + ", " + lim + "]^2; dots are test images' posterior means" +
      (DATA.legend ? ", coloured by " + DATA.legend.title + "." : ".");
    controls.appendChild(note);
    if (DATA.legend) {
      const legend = document.createElement("div");
      legend.id = "legend";
      legend.innerHTML = DATA.legend.title + ": " + DATA.legend.entries.map(([label, name]) =>
        "<span class='key'><span class='swatch' style='background:" + DATA.colours[label % 10] + "'></span>" +
        name.replace(/[&<>]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"})[c]) + "</span>").join(" ");
      controls.appendChild(legend);
    }
    const ctx = plane.getContext("2d");
    const toPx = v => (v + lim) / (2 * lim) * size;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, size, size);
    ctx.strokeStyle = "#ddd"; ctx.beginPath();
    ctx.moveTo(size / 2, 0); ctx.lineTo(size / 2, size); ctx.moveTo(0, size / 2); ctx.lineTo(size, size / 2); ctx.stroke();
    for (const [a, b, label] of DATA.points) {
      ctx.fillStyle = label < 0 ? "#555" : DATA.colours[label % 10];
      ctx.fillRect(toPx(a) - 1, size - toPx(b) - 1, 2, 2);
    }
    plane.addEventListener("pointermove", e => {
      const r = plane.getBoundingClientRect();
      z[0] = -lim + 2 * lim * (e.clientX - r.left) / r.width;
      z[1] = lim - 2 * lim * (e.clientY - r.top) / r.height;
      show(z);
    });
  } else {
    for (let d = 0; d < DATA.sliders; d++) {
      const row = document.createElement("label");
      row.className = "slider";
      row.innerHTML = "z_" + d +
        " <input type='range' min='-3' max='3' step='0.05' value='0' id='z" + d + "'>";
      controls.appendChild(row);
      row.querySelector("input").addEventListener("input", e => { z[d] = parseFloat(e.target.value); show(z); });
    }
    const note = document.createElement("p");
    note.textContent = "The first " + DATA.sliders + " of " + DATA.decoder.z_dim + " latent dimensions; the others stay at 0.";
    controls.appendChild(note);
  }
  show(z);
}
</script>
</body></html>
"""
