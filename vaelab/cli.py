"""The `vaelab` command. It parses arguments, builds a config and calls the
library; every piece of work lives in a function a notebook can call too.

A user mistake ends with one line on stderr and exit status 2 (--debug shows
the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import DEVICES, OBJECTIVES, OPTIMIZERS, SCHEDULES, RunConfig
from .errors import VaelabError
from .likelihoods import LIKELIHOODS
from .models import PRESETS, preset
from .nets import ACTIVATIONS


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line and exit with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _sizes(text: str) -> tuple[int, ...]:
    """'256,128' -> (256, 128)."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,128, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive integers, got {text!r}")
    return sizes


def _folder_options(p: argparse.ArgumentParser, d: RunConfig) -> None:
    """The options of image folders; None when not given (--resume tells given ones apart)."""
    p.add_argument("--image-size", type=int, metavar="S",
                   help="image folders: resize every image to S x S pixels (default: keep the size; all must agree)")
    p.add_argument("--test-fraction", type=float, metavar="F",
                   help=f"image folders without train/ and test/: hold out this fraction as the test set "
                        f"(default: {d.test_fraction})")
    p.add_argument("--split-seed", type=int,
                   help=f"image folders without train/ and test/: seed of the train/test split, apart from "
                        f"--seed so that runs with different seeds share one test set (default: {d.split_seed})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vaelab", description="Variational autoencoders: MNIST, your own images, MLP or conv.")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data_help = ("the four IDX files' folder, a folder of images or a .npz file (default: $VAELAB_DATA_DIR, "
                 "then ~/.cache/vaelab/mnist)")
    run_data_help = ("the four IDX files' folder, a folder of images or a .npz file (default: the one the run "
                     "was trained on when it named one, else $VAELAB_DATA_DIR, then ~/.cache/vaelab/mnist)")
    d = RunConfig()

    p = sub.add_parser("train", help="train a VAE and write a run directory",
                       description="Train a VAE. The defaults are the tutorial's recipe: z_dim=2, "
                                   "plain SGD with lr 5e-3, batch 100, 20 epochs.")
    # Every option defaults to None, so that --resume can tell which were given.
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"architecture preset (default: {d.preset})")
    p.add_argument("--z-dim", type=int, help="latent dimensions (default: the preset's)")
    p.add_argument("--encoder-hidden", type=_sizes, metavar="H1,H2",
                   help="encoder hidden sizes (default: the preset's)")
    p.add_argument("--decoder-hidden", type=_sizes, metavar="H1,H2",
                   help="decoder hidden sizes (default: the preset's)")
    p.add_argument("--conv-channels", type=_sizes, metavar="C1,C2",
                   help="with --preset conv: channels of the convolutions, each halving height and width "
                        "(default: the preset's, 32,64)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), help="hidden activation (default: the preset's)")
    p.add_argument("--likelihood", choices=LIKELIHOODS,
                   help="observation model: bernoulli on binarized pixels, gaussian on grey levels "
                        "with fixed standard deviation --sigma, gaussian-learned with a standard deviation per "
                        "pixel from the decoder (on dequantized grey levels), or logistic: a discretized "
                        f"logistic over the 256 grey levels (default: {d.model.likelihood})")
    p.add_argument("--sigma", type=float,
                   help=f"standard deviation of the gaussian likelihood (default: {d.model.sigma})")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help=f"elbo, or iwae: the importance-weighted bound of Burda et al. (default: {d.objective})")
    p.add_argument("--beta", type=float,
                   help="weight of the KL term in the training objective (beta-VAE; default: 1, the ELBO); "
                        "test_loss and evaluate stay the true negative ELBO and NLL")
    p.add_argument("--kl-warmup", type=int, metavar="E",
                   help="raise the KL weight linearly, step by step, from 0 to --beta over the first E epochs "
                        "(default: 0, no warm-up)")
    p.add_argument("--samples", type=int, metavar="L",
                   help=f"Monte-Carlo samples of z per image in the ELBO (default: {d.samples})")
    p.add_argument("--k", type=int, help=f"importance samples per image for --objective iwae (default: {d.k})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default: {d.optimizer})")
    p.add_argument("--lr", type=float, help=f"learning rate (default: {d.lr})")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="learning rate schedule; burda: lr * 10^(-i/7) for 3^i epochs, i = 0, 1, ... "
                        f"(Burda et al. 2015; 3280 epochs for i up to 7) (default: {d.schedule})")
    p.add_argument("--batch-size", type=int, help=f"(default: {d.batch_size})")
    p.add_argument("--epochs", type=int, help=f"(default: {d.epochs}; with --resume, the run's own)")
    p.add_argument("--seed", type=int, help=f"seed for weights, batches and noise (default: {d.seed})")
    p.add_argument("--device", choices=DEVICES, help=f"(default: {d.device}; with --resume, the run's own)")
    p.add_argument("--cuda-graph", choices=("on", "off"),
                   help="on CUDA, capture the training step as a graph and replay it (default: on; "
                        "with --resume, the run's own)")
    p.add_argument("--deterministic", action="store_const", const=True,
                   help="on CUDA, deterministic cuBLAS and kernels: a resumed run repeats an uninterrupted "
                        "one bit for bit on the same card (a little slower)")
    p.add_argument("--data-dir", help="the four IDX files' folder, a folder of PNG or JPEG images (classes in "
                                      "subfolders, optionally below train/ and test/) or a .npz file with "
                                      "x_train and x_test (default: $VAELAB_DATA_DIR, then ~/.cache/vaelab/mnist; "
                                      "with --resume, the run's own)")
    _folder_options(p, d)
    p.add_argument("--train-size", type=int, metavar="N", help="train on the first N training images only")
    p.add_argument("--test-size", type=int, metavar="N", help="report the loss of the first N test images only")
    p.add_argument("--out", help="run directory (default: runs/<timestamp>); must not hold a run already")
    p.add_argument("--resume", metavar="RUN",
                   help="continue RUN from its last finished epoch with its own config.json; only "
                        "--epochs (to train longer), --device, --cuda-graph and --data-dir may be given with it")
    p.add_argument("--no-plots", action="store_true", help="skip drawing the figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test log-likelihood of a run by importance sampling, to RUN/eval.json",
                       description="Estimate the test log-likelihood log p(x) by importance sampling with "
                                   "q(z|x) as proposal (K samples per image), with the negative ELBO and the "
                                   "IWAE bounds for k = 1, 5, 50 from the same samples. Nats per image.")
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=int, default=5000, help="importance samples per test image (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.eval_seed, help="fixes binarization and noise (default: %(default)s)")
    p.add_argument("--test-size", type=int, metavar="N", help="evaluate the first N test images only")
    p.add_argument("--data-dir", help=run_data_help)
    p.add_argument("--device", default="auto", choices=DEVICES, help="(default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="decoder arithmetic: bf16 was 1.5x as fast on a CPU with native bf16 and "
                        "moved the NLL by under 0.001 nats; auto picks it there (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="paired difference of two evaluated runs' test NLL",
                       description="The mean over test images of NLL(RUN_A) - NLL(RUN_B), from the per-image "
                                   "values `vaelab evaluate` wrote, with its standard error. Both runs must be "
                                   "evaluated with the same k, seed, precision and test set.")
    p.add_argument("run_a", metavar="RUN_A", help="run directory")
    p.add_argument("run_b", metavar="RUN_B", help="run directory")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="redraw the figures of a run", description="Redraw RUN/figures/*.png.")
    p.add_argument("run", help="run directory")
    p.add_argument("--data-dir", help=run_data_help)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("sample", help="draw images from the prior into a PNG",
                       description="Decode z ~ N(0, I) and save a grid of the decoder means.")
    p.add_argument("run", help="run directory")
    p.add_argument("-n", type=int, default=64, help="number of samples (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("report", help="one self-contained HTML page of a run, with a latent explorer",
                       description="Write RUN/report.html: configuration, metrics, evaluation, figures and an "
                                   "interactive latent explorer that decodes in the browser (works offline).")
    p.add_argument("run", help="run directory")
    p.add_argument("-o", "--output", help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--data-dir", help=run_data_help)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("data", help="fetch and verify MNIST, or read your images, and say what was found",
                       description="Find (or fetch) the four IDX files and verify them, or read a folder of "
                                   "images or an .npz file, and print what it holds.")
    p.add_argument("--data-dir", help=data_help)
    _folder_options(p, d)
    p.set_defaults(func=cmd_data)
    return parser


# What `vaelab train` options may accompany --resume (the rest is the run's config.json).
RESUME_OPTIONS = ("epochs", "device", "cuda_graph", "data_dir", "resume", "quiet", "no_plots", "debug", "command", "func")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig that `vaelab train` options describe (unset options take the defaults)."""
    d = RunConfig()

    def given(name: str, default):
        value = getattr(args, name)
        return default if value is None else value

    name = given("preset", d.preset)
    model = preset(name, z_dim=args.z_dim, encoder_hidden=args.encoder_hidden,
                   decoder_hidden=args.decoder_hidden, conv_channels=args.conv_channels, activation=args.activation,
                   likelihood=given("likelihood", d.model.likelihood), sigma=given("sigma", d.model.sigma))
    return RunConfig(model=model, preset=name, objective=given("objective", d.objective),
                     samples=given("samples", d.samples), k=given("k", d.k), beta=given("beta", d.beta),
                     kl_warmup=given("kl_warmup", d.kl_warmup),
                     optimizer=given("optimizer", d.optimizer), lr=given("lr", d.lr),
                     schedule=given("schedule", d.schedule), batch_size=given("batch_size", d.batch_size),
                     epochs=given("epochs", d.epochs), seed=given("seed", d.seed),
                     device=given("device", d.device), cuda_graph=given("cuda_graph", "on") == "on",
                     deterministic=given("deterministic", d.deterministic), data_dir=args.data_dir,
                     image_size=args.image_size, test_fraction=given("test_fraction", d.test_fraction),
                     split_seed=given("split_seed", d.split_seed),
                     train_size=args.train_size,
                     test_size=args.test_size)


def resumed_config(args: argparse.Namespace) -> RunConfig:
    """The config of the run that --resume continues, with the options allowed to change."""
    from .runs import load_config

    if args.out:
        raise VaelabError("--resume RUN continues RUN in place; leave out --out")
    fixed = [name for name, value in vars(args).items() if name not in RESUME_OPTIONS and value is not None]
    if fixed:
        flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
        raise VaelabError(f"{flags} cannot change when resuming: {args.resume}/config.json fixes the run; "
                          f"leave {'them' if len(fixed) > 1 else 'it'} out "
                          "(only --epochs, --device, --cuda-graph and --data-dir may be given)")
    config = load_config(args.resume)
    for name in ("epochs", "device", "data_dir"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.cuda_graph is not None:
        config.cuda_graph = args.cuda_graph == "on"
    return config


def _same_run(a: RunConfig, b: RunConfig) -> bool:
    """Whether two configs describe the same run (what a run resolves when it starts aside)."""
    def essentials(c: RunConfig) -> dict:
        d = c.to_dict()
        d.pop("data_dir")
        d["model"].pop("image_shape")
        return d
    return essentials(a) == essentials(b)


def _plan(args: argparse.Namespace, world) -> tuple[RunConfig, Path, bool]:
    """The run's config, its folder and whether it resumes (decided by rank 0, which holds the folder).

    After torchrun restarted the group (same command line), the run resumes from its folder's
    checkpoint, or starts afresh there if none was written yet.
    """
    from .runs import CHECKPOINT, CONFIG, claimed_by, fresh_run_path, load_config

    if args.resume:
        return resumed_config(args), Path(args.resume), True
    config = config_from_args(args)
    run_dir = Path(args.out or fresh_run_path())
    # Only a folder this torchrun job created: another's is refused as at a first start.
    if world.restarts and (run_dir / CONFIG).is_file() and claimed_by(run_dir, world.run_id):
        saved = load_config(run_dir)
        if not _same_run(saved, config):
            raise VaelabError(f"torchrun restarted this job, but {run_dir / CONFIG} describes another run; "
                              "choose another --out")
        if (run_dir / CHECKPOINT).is_file():
            return saved, run_dir, True
        (run_dir / CONFIG).unlink()  # no epoch finished: start afresh in the same folder
    return config, run_dir, False


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .data import load_data
    from .train import train

    world = distributed.from_environment()
    if world.distributed and not (args.out or args.resume):
        raise VaelabError("under torchrun, give --out DIR: every rank, and every restart, must name the same run")
    distributed.start(world)
    config, run_dir, resume = distributed.share_result(lambda: _plan(args, world), world)
    if args.data_dir is not None or not args.resume:  # each machine may keep the data in its own folder
        config.data_dir = args.data_dir
    config.validate()  # before anything is fetched or written
    data = load_data(config.data_dir, progress=not args.quiet and world.main, **config.data_options())
    if config.data_dir is not None or not data.verified:
        # Recorded absolute, so that later commands find it from any folder.
        config.data_dir = str(data.directory.resolve())
    result = train(config, run_dir, data, progress=not args.quiet, resume=resume, world=world)
    if world.main:
        if not args.no_plots:
            from .plots import draw_figures  # matplotlib: only once there is something to draw

            draw_figures(run_dir, result.model, result.data, result.metrics)
        last = result.metrics[-1]
        print(f"test negative ELBO after {last['epoch']} epochs: {last['test_loss']:.2f} nats per image; "
              f"run saved in {run_dir}")
    distributed.finish(world)
    return 0


def _load(run: str, data_dir: str | None, device: str = "cpu", world=None):
    """A run's model and data (the run's own data folder unless given). Under torchrun rank 0
    reads the run and passes the weights on; every rank reads its own data."""
    from . import distributed
    from .data import load_data
    from .runs import load_config, load_run

    world = world or distributed.SINGLE
    config, model = distributed.share_result(lambda: (load_config(run), load_run(run)), world)
    model = model.to(distributed.pick_device(device, world))
    if data_dir and config.image_size and not Path(data_dir).is_dir():
        raise VaelabError(f"{run} was trained on an image folder resized to {config.image_size} pixels "
                          f"(config.json); --data-dir {data_dir} is not a folder of images")
    data = load_data(data_dir or config.data_dir, progress=world.main, **config.data_options())
    if data.image_shape != model.config.image_shape:
        shape = lambda s: "x".join(map(str, s))
        raise VaelabError(f"the images in {data.directory} are {shape(data.image_shape)} (channels x height x "
                          f"width) but the model in {run} expects {shape(model.config.image_shape)}")
    return model, data


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import distributed
    from .evaluate import importance_sampled
    from .runs import check_writable, write_eval

    for name in ("k", "test_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise VaelabError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    world = distributed.from_environment()
    distributed.start(world)
    model, data = _load(args.run, args.data_dir, args.device, world)
    data = data.subset(None, args.test_size)
    # before minutes of work
    distributed.share_result(lambda: check_writable(Path(args.run), "eval.json goes there: make it writable"), world)
    start = time.perf_counter()
    r = importance_sampled(model, data.test_images, k=args.k, seed=args.seed, precision=args.precision,
                           progress=not args.quiet, world=world)
    r["seconds"], r["device"], r["processes"] = time.perf_counter() - start, str(model.device), world.size
    if world.main:
        write_eval(args.run, r)
    distributed.finish(world)
    if not world.main:
        return 0
    bounds = ", ".join(f"k={j}: {v:.2f}" for j, v in r["iwae"].items())
    bits = f" ({r['bits_per_dim']:.4f} bits per dimension)" if "bits_per_dim" in r else ""
    print(f"test NLL (importance sampling, K={r['k']}, {r['precision']}): {r['nll']:.3f} nats per image{bits}, "
          f"Monte-Carlo s.e. {r['nll_se']:.3f}, s.e. over {r['test_images']} images "
          f"{'n/a' if r['nll_se_images'] is None else format(r['nll_se_images'], '.3f')}\n"
          f"negative ELBO: {r['neg_elbo']:.3f}; negative IWAE bounds: {bounds}\n"
          f"written to {Path(args.run) / 'eval.json'} (per image: log_px.npy)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluate import compare
    from .runs import read_eval, read_log_px

    records = []
    for run in (args.run_a, args.run_b):
        record, log_px = read_eval(run), read_log_px(run)
        if record is None or log_px is None:
            missing = "eval.json" if record is None else "log_px.npy"
            raise VaelabError(f"{run} has no {missing}: run `vaelab evaluate {run}` first")
        records.append((record, log_px))
    (a, pa), (b, pb) = records
    r = compare(a, pa, b, pb)
    print(f"test NLL: {args.run_a} {r['nll_a']:.3f}, {args.run_b} {r['nll_b']:.3f} nats per image "
          f"(K={a['k']}, {r['images']} images)\n"
          f"paired difference (first minus second): {r['difference']:+.4f} nats per image, "
          f"standard error {r['se']:.4f} over images (Monte-Carlo {r['mc_se']:.4f})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import draw_figures
    from .runs import read_metrics

    model, data = _load(args.run, args.data_dir)
    paths = draw_figures(args.run, model, data, read_metrics(args.run))
    print(f"drew {len(paths)} figures into {Path(args.run) / 'figures'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .plots import sample_images, save_image_grid
    from .runs import load_run

    if args.n < 1:
        raise VaelabError(f"-n must be a positive integer, got {args.n}")
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise VaelabError(f"-o must name a .png file, got {out}")
    if out.exists() and not args.force:
        raise VaelabError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise VaelabError(f"cannot write {out}: folder {out.parent} does not exist")
    model = load_run(args.run)
    try:
        save_image_grid(out, sample_images(model, args.n, args.seed))
    except OSError as e:
        raise VaelabError(f"cannot write {out} ({e.strerror or e})") from None
    print(f"wrote {args.n} samples to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    model, data = _load(args.run, args.data_dir)
    if args.output and not Path(args.output).parent.is_dir():
        raise VaelabError(f"cannot write {args.output}: folder {Path(args.output).parent} does not exist")
    try:
        path = write_report(args.run, model, data, args.output)
    except OSError as e:
        raise VaelabError(f"cannot write the report ({e.strerror or e})") from None
    print(f"wrote {path}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import load_data

    d = RunConfig()
    data = load_data(args.data_dir, image_size=args.image_size,
                     test_fraction=d.test_fraction if args.test_fraction is None else args.test_fraction,
                     split_seed=d.split_seed if args.split_seed is None else args.split_seed)
    kind = ("MNIST, verified by SHA-256" if data.verified else
            {"idx": "IDX files, not MNIST", "folder": "a folder of images", "npz": "arrays from a .npz file"}[data.source])
    c, h, w = data.image_shape
    labels = ("no labels" if data.train_labels is None else
              f"{len(data.label_names)} classes" if data.label_names else "labelled")
    print(f"{data.directory}: {kind}; {len(data.train_images)} training and {len(data.test_images)} "
          f"test images of {w}x{h} pixels, {'greyscale' if c == 1 else f'{c} channels'}, {labels}")
    return 0


# The commands that run under torchrun; the others work in one process.
DISTRIBUTED_COMMANDS = ("train", "evaluate")


def main(argv: list[str] | None = None) -> int:
    from . import distributed

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
            raise VaelabError(f"vaelab {args.command} runs in one process: start it without torchrun")
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
