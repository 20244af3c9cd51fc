"""The `vaelab` command. It parses arguments into the option dataclasses of config.py, whose
declarations give every flag, and calls the library; every piece of work lives in a function
a notebook can call too.

A user mistake ends with one line on stderr and exit status 2 (--debug shows
the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np

from . import config
from .config import Options, flag_of
from .errors import VaelabError
from .registry import import_plugins, plugin_names


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line and exit with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _sizes(text: str) -> tuple[int, ...]:
    """'256,128' -> (256, 128)."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 256,128, got {text!r}"
        )
    return sizes  # the option's rule refuses sizes below 1, and none at all


def _names(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']: a repeatable option's values, given one by one or comma-separated."""
    return list(plugin_names([text]))


# What the command line reads for each annotation (the part before "| None").
_PARSE = {"int": int, "float": float, "str": str, "tuple[int, ...]": _sizes}


def _default_text(f, meta: dict) -> str | None:
    if meta["default_text"] is not None:
        text = meta["default_text"]
        return text() if callable(text) else text  # a function: what is registered now
    default = f.default
    if default is MISSING or default is None or (isinstance(default, bool) and not meta["values"]):
        return None
    if meta["values"]:
        return next(word for word, value in meta["values"].items() if value == default)
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def _help(f, meta: dict, resume_note: bool) -> str:
    default = _default_text(f, meta)
    note = None if default is None else f"default: {default}"
    if note and resume_note and meta["resume"]:
        note += "; with --resume, the run's own"
    text = " ".join(part for part in (meta["help"], note and f"({note})") if part)
    return text.replace("%", "%%")  # argparse formats help with %


def _nested(f) -> bool:
    """Whether field f holds an option dataclass of its own (a run's model)."""
    return isinstance(f.default_factory, type) and issubclass(f.default_factory, Options)


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    only: tuple[str, ...] | None = None,
    resume_note: bool = False,
) -> None:
    """A flag (or a positional argument) for each declared option of cls, nested option
    dataclasses (a run's model) in place. Flags not given stay out of the namespace."""
    for f in fields(cls):
        if _nested(f):
            add_options(parser, f.default_factory, only, resume_note)
            continue
        meta = f.metadata.get("option")
        if meta is None or not meta["command_line"] or (only is not None and f.name not in only):
            continue
        if meta["positional"]:
            parser.add_argument(f.name, metavar=meta["metavar"], help=_help(f, meta, resume_note))
            continue
        spellings = [s for s in (meta["short"], flag_of(f), *meta["aliases"]) if s]
        annotation = (
            f.type.__name__ if isinstance(f.type, type) else str(f.type)
        )  # a string under PEP 563
        kind = annotation.split("|")[0].strip()
        keywords = dict(dest=f.name, help=_help(f, meta, resume_note))
        if f.default is MISSING:
            keywords["required"] = True
        else:
            keywords["default"] = argparse.SUPPRESS
        if meta["values"]:
            keywords["choices"] = tuple(meta["values"])
        elif kind == "bool":
            keywords["action"] = "store_true"
        elif kind == "tuple[str, ...]":  # repeatable: --plugin a --plugin b,c
            keywords.update(action="extend", type=_names, metavar=meta["metavar"])
        else:  # choices: a tuple, or a registry that argparse reads when it checks and lists
            keywords.update(type=_PARSE[kind], choices=meta["choices"], metavar=meta["metavar"])
        parser.add_argument(*spellings, **keywords)


def given(args: argparse.Namespace, cls: type) -> dict:
    """The options of cls (and its nested option dataclasses) given on the command line."""
    out = {}
    for f in fields(cls):
        if _nested(f):
            out.update(given(args, f.default_factory))
        elif "option" in f.metadata and hasattr(args, f.name):
            values = f.metadata["option"]["values"]
            value = getattr(args, f.name)
            value = tuple(value) if isinstance(value, list) else value  # a repeated option's
            out[f.name] = values[value] if values else value
    return out


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vaelab", description="Variational autoencoders: MNIST, your own images, MLP or conv."
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    parser.add_argument("--version", action="version", version=f"vaelab {_version()}",
                        help="print vaelab's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(
        name: str, func, help: str, description: str, *classes, only=None, resume_note=False
    ):
        p = sub.add_parser(name, help=help, description=description)
        for cls in classes:
            add_options(p, cls, only, resume_note)
        p.set_defaults(func=func)

    command(
        "train",
        cmd_train,
        "train a VAE and write a run directory",
        "Train a VAE. The defaults are the tutorial's recipe: z_dim=2, plain SGD with lr 5e-3,"
        " batch 100, 20 epochs.",
        config.RunConfig,
        config.Launch,
        resume_note=True,
    )
    command(
        "train-prior",
        cmd_train_prior,
        "train a VQ-VAE run's prior over its codes, into RUN/prior",
        "Train a small causal transformer p(codes) on the code grids of the run's training images"
        " (encoded afresh each epoch, dynamically binarized), resuming RUN/prior where it stopped;"
        " then `vaelab sample` draws from it and `vaelab evaluate` bounds -log p(x) with it.",
        config.TrainPriorOptions,
    )
    command(
        "evaluate",
        cmd_evaluate,
        "test log-likelihood of a run by importance sampling, to RUN/eval.json",
        "Estimate the test log-likelihood log p(x) by importance sampling with q(z|x) as proposal"
        " (K samples per image), with the negative ELBO and the IWAE bounds for k = 1, 5, 50 from"
        " the same samples. Nats per image. A VQ-VAE's posterior is a point: for it, the upper"
        " bound -log p(x|z_q) - log p(z_q) under the uniform prior and, once trained, the learned"
        " one.",
        config.EvaluateOptions,
    )
    command(
        "gap",
        cmd_gap,
        "the approximation and amortization gaps of a run, to RUN/gap.json",
        "Fit a posterior of the model's own family to each of the first N test images, starting"
        " from the encoder's, and split the distance between the encoder's ELBO and log p(x) into"
        " the approximation gap, log p(x) - L[q*], and the amortization gap, L[q*] - L[q] (Cremer,"
        " Li & Duvenaud 2018). Nats per image.",
        config.GapOptions,
    )
    command(
        "encode",
        cmd_encode,
        "each image's latent code under a run's encoder, to FILE.npz and FILE.csv",
        "For each image of the split (the run's own data unless --data-dir): index, label where"
        " there are labels, q(z_1|x)'s mu and logvar (with --posterior iaf, its base Gaussian's),"
        " and for a flow posterior or several stochastic layers z_mean, E_q[z] of every layer"
        " from --draws keyed draws.",
        config.EncodeOptions,
    )
    command(
        "score",
        cmd_score,
        "each image's log p(x) under a run's model, to FILE.npz and FILE.csv",
        "For each image of the split (the run's own data unless --data-dir; images of another"
        " shape are refused): index, label where there are labels, log_px by importance sampling"
        " with K=--k draws from q(z|x) and its Monte-Carlo standard error log_px_se, the elbo from"
        " the same draws, and bits_per_dim for the discrete likelihoods. The same computation as"
        " `vaelab evaluate`: the run's test set with its k, seed and precision gives its values.",
        config.ScoreOptions,
    )
    command(
        "compare",
        cmd_compare,
        "paired difference of two evaluated runs' test NLL",
        "The mean over test images of NLL(RUN_A) - NLL(RUN_B), from the per-image values `vaelab"
        " evaluate` wrote, with its standard error. Both runs must be evaluated with the same"
        " seed and test set; evaluations with different K or at different precisions pair, with"
        " a note.",
        config.CompareOptions,
    )
    command(
        "plot",
        cmd_plot,
        "redraw the figures of a run",
        "Redraw RUN/figures/*.png.",
        config.PlotOptions,
    )
    command(
        "sample",
        cmd_sample,
        "draw images from the prior into a PNG",
        "Decode z ~ p(z), the run's prior, and save a grid of the decoder means.",
        config.SampleOptions,
    )
    command(
        "report",
        cmd_report,
        "one self-contained HTML page of a run, with a latent explorer",
        "Write RUN/report.html: configuration, metrics, evaluation, figures and an interactive"
        " latent explorer that decodes in the browser (works offline).",
        config.ReportOptions,
    )
    command(
        "data",
        cmd_data,
        "fetch and verify MNIST, or read your images, and say what was found",
        "Find (or fetch) the four IDX files and verify them, or read a folder of images or an .npz"
        " file, and print what it holds.",
        config.RunConfig,
        only=config.DATA_COMMAND_OPTIONS,
    )
    return parser


def _parsed(args: argparse.Namespace, cls: type):
    """The option dataclass of a command, from its arguments, checked."""
    options = cls(**given(args, cls))
    config.check(options)
    return options


def _distributed(args: argparse.Namespace, cls: type, run) -> tuple:
    """A command that torchrun may share out: its options, run(options, world) on every rank,
    then the group left. Returns (options, world, result)."""
    from . import distributed

    options = _parsed(args, cls)
    world = distributed.from_environment()
    result = run(options, world)
    distributed.finish(world)
    return options, world, result


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed, progress
    from .start import interrupted_note, prepare
    from .train import summary, train

    launch = _parsed(args, config.Launch)
    world = distributed.from_environment()
    callbacks = []
    if launch.mlflow and world.main:  # made first: a missing extra is said before any work
        from .tracking import MLflowTracker

        callbacks.append(MLflowTracker(launch.mlflow))
    run_dir = None
    try:
        run, run_dir, resume = prepare(given(args, config.RunConfig), launch.out, launch.resume,
                                       world)
        result = train(run, run_dir, progress=not launch.quiet, resume=resume, world=world,
                       tensorboard=launch.tensorboard, callbacks=callbacks)
    except KeyboardInterrupt:
        if world.main:
            progress.close_bars()
            print(f"vaelab: interrupted; {interrupted_note(run_dir)}", file=sys.stderr)
        return 130
    if world.main:
        if not launch.no_plots:
            from .plots import draw_figures  # matplotlib: only once there is something to draw

            draw_figures(run_dir, result.model, result.data, result.metrics)
            if launch.mlflow:  # drawn after fit, whose tracker logged the folder as it was
                from .tracking import log_artifacts

                log_artifacts(launch.mlflow, run_dir)
        if not launch.quiet:
            print(f"{summary(run, result.metrics[-1])}; run saved in {run_dir}")
    distributed.finish(world)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    options, world, r = _distributed(args, config.EvaluateOptions, evaluate_run)
    if world.main:
        # The figure is drawn here, not by evaluate_run: evaluate stays free of matplotlib.
        from .plots import draw_kl_figure

        draw_kl_figure(options.run, r)
        if options.mlflow:
            from .tracking import log_evaluation

            log_evaluation(options.mlflow, options.run)
    if not world.main or options.quiet:
        return 0
    if r.get("estimate") == "bound":
        print(bound_text(r) + f"\nwritten to {Path(options.run) / 'eval.json'} (per image:"
              " log_px.npy, each a lower bound on log p(x))")
        return 0
    bounds = ", ".join(f"k={j}: {v:.2f}" for j, v in r["iwae"].items())
    bits = f" ({r['bits_per_dim']:.4f} bits per dimension)" if "bits_per_dim" in r else ""
    # a conditional model's: -log p(x|y), the likelihood of each image given its label
    nll = "NLL" if r.get("quantity", "log p(x)") == "log p(x)" else f"NLL -{r['quantity']}"
    print(
        f"test {nll} (importance sampling, K={r['k']}, {r['precision']}): {r['nll']:.3f} nats per"
        f" image{bits}, Monte-Carlo s.e. {r['nll_se']:.3f}, s.e. over {r['test_images']} images"
        f" {'n/a' if r['nll_se_images'] is None else format(r['nll_se_images'], '.3f')}\nnegative"
        f" ELBO: {r['neg_elbo']:.3f}; negative IWAE bounds: {bounds}\n{diagnostics_text(r)}\n"
        f"written to {Path(options.run) / 'eval.json'} (per image: log_px.npy)"
    )
    return 0


def bound_text(r: dict) -> str:
    """A VQ-VAE's evaluation: its upper bounds on the test NLL, one line each."""
    names = {"uniform": "the uniform prior, log K per code", "learned": "the learned prior"}
    lines = [f"upper bounds on the test NLL, -log p(x|z_q) - log p(z_q) at each image's codes"
             f" (a bound, not an importance-sampled estimate; {r['test_images']} images):"]
    for name, value in r["bounds"].items():
        bits = (f" ({value['bits_per_dim']:.4f} bits per dimension)"
                if "bits_per_dim" in value else "")
        lines.append(f"  with {names[name]}: {value['nats']:.3f} nats per image{bits}")
    if "learned" not in r["bounds"]:
        lines.append("  with a learned prior: run `vaelab train-prior RUN`, then evaluate again")
    lines.append(f"reconstruction term -log p(x|z_q): {r['reconstruction']:.3f} nats per image")
    return "\n".join(lines)


def diagnostics_text(r: dict) -> str:
    """The evaluation's diagnostics in two lines."""
    units = ", ".join(f"{a} of {len(v)}" for a, v in zip(r["active_units"], r["latent_variance"]))
    active = (f"active units: {units} (variance over test images of E_q[z_d] above"
              f" {r['active_threshold']}; E_q[z]: {r['posterior_mean']})")
    if "kl_per_layer" in r:
        layers = ", ".join(f"{v:.2f}" for v in r["kl_per_layer"])
        return f"{active}\nKL per layer, the top first: {layers} nats"
    if "kl_per_dim" not in r:
        return f"{active}\n{r['kl_per_dim_note']}"
    kl = sorted(r["kl_per_dim"], reverse=True)
    top = ", ".join(f"{v:.2f}" for v in kl[:5])
    return f"{active}\nKL per dimension, largest first: {top}{', ...' if len(kl) > 5 else ''} nats"


def cmd_gap(args: argparse.Namespace) -> int:
    from .gap import GAP, gap_run

    options, world, r = _distributed(args, config.GapOptions, gap_run)
    if not world.main or options.quiet:
        return 0
    value = lambda name: f"{r[name]['mean']:.3f} ± {r[name]['se'] or 0:.3f}"
    print(
        f"over the first {r['images']} test images (K={r['k']}), nats per image ± s.e. over"
        " images:\n"
        f"log p(x) {value('log_px')}; ELBO of the fitted posteriors L[q*] {value('elbo_fitted')};"
        f" of the encoder L[q] {value('elbo_encoder')}\napproximation gap log p(x) - L[q*]:"
        f" {value('approximation_gap')}; amortization gap L[q*] - L[q]:"
        f" {value('amortization_gap')}\n"
        f"written to {Path(options.run) / GAP}"
    )
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .score import encode_run

    options, world, (path, csv, table) = _distributed(args, config.EncodeOptions, encode_run)
    if world.main and not options.quiet:
        print(f"codes of {_counted(table)} written to {path} and {csv}")
    return 0


def _counted(table: dict) -> str:
    """'10000 test images', or '70000 images (10000 test, 60000 train)': a table's split column
    counted."""
    names, counts = np.unique(table["split"], return_counts=True)
    if len(names) == 1:
        return f"{counts[0]} {names[0]} images"
    return f"{counts.sum()} images ({', '.join(f'{c} {n}' for n, c in sorted(zip(names, counts)))})"


def cmd_score(args: argparse.Namespace) -> int:
    from .score import score_run

    options, world, (path, csv, table) = _distributed(args, config.ScoreOptions, score_run)
    if world.main and not options.quiet:
        log_px = table["log_px"]
        k = f"K={options.k}" if options.k else "the model's default K"
        print(f"log p(x) of {_counted(table)} ({k}): mean {log_px.mean():.3f}, from"
              f" {log_px.min():.3f} to {log_px.max():.3f} nats; written to {path} and {csv}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .diagnostics import compare_runs

    options = _parsed(args, config.CompareOptions)
    r = compare_runs(options.run_a, options.run_b)
    print(
        f"test NLL: {options.run_a} {r['nll_a']:.3f}, {options.run_b} {r['nll_b']:.3f} nats per"
        f" image ({'K=' + str(r['k']) if not r['ks'] else 'K=%s and %s' % r['ks']},"
        f" {r['images']} images)\npaired difference (first minus second):"
        f" {r['difference']:+.4f} nats per image, standard error {r['se']:.4f} over images"
        f" (Monte-Carlo {r['mc_se']:.4f})"
    )
    if r["estimates"]:
        a, b = r["estimates"]
        print(f"note: the first is by {a}, the second by {b}; a bound is an upper bound on the"
              " NLL, so the difference over-states the bounded model's NLL")
    if r["quantities"]:
        a, b = r["quantities"]
        print(f"note: the first estimates {a}, the second {b}, each image with its own label y")
    if r["ks"]:
        a, b = r["ks"]
        print(f"note: K={a} and K={b} importance samples; a smaller K's estimate of log p(x) is"
              " lower on average, so its model's NLL is over-stated the more")
    if r["precisions"]:
        a, b = r["precisions"]
        print(f"note: the decoders ran at different precisions ({a} and {b}), the draws were the"
              " same")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import draw_figures
    from .runs import read_metrics
    from .start import load_run_and_data

    options = _parsed(args, config.PlotOptions)
    model, data = load_run_and_data(options.run, options.data_dir)
    paths = draw_figures(options.run, model, data, read_metrics(options.run))
    print(f"drew {len(paths)} figures into {Path(options.run) / 'figures'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .plots import write_samples

    options = _parsed(args, config.SampleOptions)
    path = write_samples(options.run, options.output, options.n, options.seed, options.force,
                         options.label, options.temperature)
    of = "" if options.label is None else f" of class {options.label}"
    of += "" if options.temperature == 1.0 else f" at temperature {options.temperature}"
    print(f"wrote {options.n} samples{of} to {path}")
    return 0


def cmd_train_prior(args: argparse.Namespace) -> int:
    from .plots import samples_figure
    from .runs import FIGURES, PRIOR, load_run
    from .train_prior import train_prior

    options = _parsed(args, config.TrainPriorOptions)
    metrics = train_prior(options)
    model = load_run(options.run)  # with the prior just trained
    path = Path(options.run) / FIGURES / "samples.png"
    path.parent.mkdir(exist_ok=True)
    samples_figure(model).savefig(path, dpi=100)
    if not options.quiet:
        epochs = f"{len(metrics)} epoch{'s' * (len(metrics) != 1)}"
        print(f"prior over codes after {epochs}: test {metrics[-1]['test_nll']:.2f}"
              f" nats per image; saved in {Path(options.run) / PRIOR}; samples in {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .start import load_run_and_data

    options = _parsed(args, config.ReportOptions)
    model, data = load_run_and_data(options.run, options.data_dir)
    print(f"wrote {write_report(options.run, model, data, options.output)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import load_data

    run = config.RunConfig.from_options(given(args, config.RunConfig))
    run.validate()
    data = load_data(run.data_dir, **run.data_options())
    print(data.describe())
    return 0


# The commands that run under torchrun; the others work in one process.
DISTRIBUTED_COMMANDS = ("train", "evaluate", "gap", "encode", "score")


def _plugins_named(argv: list[str]) -> tuple[str, ...]:
    """The modules that --plugin names on the command line, found before the parser is built:
    their components must be registered when the parser lists and checks the choices."""
    values = [word.split("=", 1)[1] for word in argv if word.startswith("--plugin=")]
    values += [after for word, after in zip(argv, argv[1:]) if word == "--plugin"]
    return plugin_names(values)


def main(argv: list[str] | None = None) -> int:
    from . import distributed

    argv = sys.argv[1:] if argv is None else argv
    try:
        import_plugins(_plugins_named(argv))
    except VaelabError as e:
        if "--debug" in argv:
            raise
        print(f"vaelab: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    world = distributed.from_environment()
    code = _run(args, world)
    if world.torchrun and args.command in DISTRIBUTED_COMMANDS:
        # Leave without the interpreter's teardown: under gloo a rank's exit was seen to abort
        # ("terminate called without an active exception") after all its work was written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace, world) -> int:
    """Run the command; a user mistake becomes one line and status 2."""
    from . import distributed

    try:
        if world.distributed and args.command not in DISTRIBUTED_COMMANDS:
            raise VaelabError(
                f"vaelab {args.command} runs in one process: start it without torchrun"
            )
        return args.func(args)
    except VaelabError as e:
        if args.debug:
            raise
        where = f" (rank {world.rank})" if world.distributed else ""
        print(f"vaelab: error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaelab: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.stop()


if __name__ == "__main__":
    sys.exit(main())
