"""C kernels for training on binary images on the CPU (kernels.c), compiled at first use.

A binarized batch is kept as the list of its on-pixels, about 100 of 784 per
MNIST digit (`BinaryBatch`). The training step then uses these kernels
besides PyTorch's matrix products:

- `binary_linear`: the first layer, x W^T + b, as a sum of rows of W^T;
- `binary_linear_accumulate_`: its weight gradient (or SGD step), W^T += alpha X^T dy,
  touching only those rows;
- `bernoulli_loss_grad_`: the Bernoulli term and its gradient in one pass over the logits
  (and `bernoulli_log_likelihood`, the term alone per row, for evaluation);
- `gaussian_latent` and `gaussian_latent_backward`: z = mu + std * eps with the KL, and back
  (two calls instead of two dozen small tensor operations).

`BinaryImages` stores the training set by its non-zero pixels and draws
batches (dynamic binarization) from random bits seeded by the run's generator.

The library is built with the system's C compiler ($CC, else cc) into
~/.cache/vaelab/kernels (or $VAELAB_KERNEL_DIR) once per source, flags and
CPU; `available()` says whether that worked, `unavailable_reason()` why not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
# Not -ffast-math: reassociation (so that sums vectorise) and fused multiply-adds,
# but infinities and NaNs keep their meaning.
FLAGS = ["-O3", "-std=gnu99", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
         "-fno-signed-zeros", "-fassociative-math", "-ffp-contract=fast"]
# Tried in turn: for this CPU and with OpenMP (libgomp, the runtime PyTorch's CPU
# wheels load, so both share one pool of threads), then without either.
VARIANTS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "binarize_batch": ([_ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, ctypes.c_uint64, _ptr, _ptr, _ptr, _ptr, _ptr,
                        _int], _int),
    "binary_linear": ([_ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _int], None),
    "binary_linear_accumulate": ([_ptr, _ptr, _i64, _ptr, _i64, _f32, _ptr, _int], None),
    "bernoulli_loss_grad": ([_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _f32, _ptr, _int], ctypes.c_double),
    "bernoulli_log_likelihood": ([_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _int], None),
    "gaussian_latent": ([_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr], ctypes.c_double),
    "gaussian_latent_backward": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _f32, _ptr], None),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("VAELAB_KERNEL_DIR") or Path.home() / ".cache" / "vaelab" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: list[str], output: Path) -> str | None:
    """Builds the library at output; returns None, or the compiler's complaint."""
    complaint = ""
    for extra in VARIANTS:
        tmp = output.with_name(f"{output.name}.{os.getpid()}.tmp")
        result = subprocess.run([*compiler, *FLAGS, *extra, str(SOURCE), "-o", str(tmp)],
                                capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(tmp, output)  # atomic: a concurrent build never sees half a file
            return None
        tmp.unlink(missing_ok=True)
        complaint = (result.stderr.strip().splitlines() or ["failed"])[-1]
    return complaint


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not)."""
    compiler = shlex.split(os.environ.get("CC") or "cc")  # e.g. CC="ccache gcc"
    if not compiler or shutil.which(compiler[0]) is None:
        return None, f"no C compiler ({' '.join(compiler)}) found"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), repr((FLAGS, VARIANTS, compiler)).encode(),
                                      platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    why = ""
    for cached in (True, False):  # the cache, else a private folder removed once the library is loaded
        folder, private = _cache_dir(), None
        try:
            if cached:
                folder.mkdir(parents=True, exist_ok=True)
            else:
                folder = private = Path(tempfile.mkdtemp(prefix="vaelab-kernels-"))
            path = folder / f"kernels-{key}.so"
            if not path.exists():
                complaint = _compile(compiler, path)
                if complaint is not None:
                    why = f"{compiler[0]} could not build {SOURCE.name}: {complaint}"
                    continue
                for old in folder.glob("kernels-*.so"):  # builds of older sources (mapped ones stay usable)
                    if old != path:
                        old.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(path))
            break
        except OSError as e:
            why = f"could not build or load the kernels in {folder}: {e}"
        finally:
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)  # a loaded library stays mapped
    else:
        return None, why
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib, ""


def available() -> bool:
    """Whether the kernels are built and loaded (building them on first call)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"the C kernels are unavailable: {why}")
    return lib


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check_batch(x: "BinaryBatch") -> None:
    _check(x.active, torch.int32, "active")
    _check(x.rows_of, torch.int32, "rows_of")
    for t, name in ((x.begin, "begin"), (x.end, "end"), (x.pixel_start, "pixel_start")):
        _check(t, torch.int64, name)
    if len(x.end) != len(x.begin) or len(x.pixel_start) != x.x_dim + 1:
        raise ValueError("a BinaryBatch needs begin and end of one length and x_dim + 1 pixel starts")


def _check(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    # ctypes passes raw pointers: a wrong layout would be read as garbage, so refuse it.
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor, got {t.dtype} "
                         f"{'contiguous' if t.is_contiguous() else 'strided'} on {t.device}")


@dataclass
class BinaryBatch:
    """A batch of binary images as its on-pixels, by row and by pixel: row i's
    are active[begin[i]:end[i]] (int32 pixel indices, ascending), pixel p's rows
    are rows_of[pixel_start[p]:pixel_start[p+1]] (ascending); x_dim pixels a row."""

    active: torch.Tensor       # (room,) int32; only the rows' ranges are meaningful
    begin: torch.Tensor        # (rows,) int64
    end: torch.Tensor          # (rows,) int64
    pixel_start: torch.Tensor  # (x_dim + 1,) int64
    rows_of: torch.Tensor      # (room,) int32
    x_dim: int

    def __len__(self) -> int:
        return len(self.begin)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.x_dim

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "BinaryBatch":
        """x: (N, D) of 0s and 1s (any dtype) -> its on-pixels."""
        on = x != 0
        counts = on.sum(1)
        end = torch.cumsum(counts, 0)
        by_pixel = on.t().nonzero()  # (pixel, row) pairs, pixel-major, rows ascending
        pixel_start = torch.zeros(x.shape[1] + 1, dtype=torch.int64)
        torch.cumsum(on.sum(0), 0, out=pixel_start[1:])
        return cls(on.nonzero()[:, 1].to(torch.int32), end - counts, end, pixel_start,
                   by_pixel[:, 1].to(torch.int32).contiguous(), x.shape[1])

    def dense(self) -> torch.Tensor:
        """(rows, x_dim) float32 of 0s and 1s."""
        x = torch.zeros(len(self), self.x_dim)
        for i, (b, e) in enumerate(zip(self.begin.tolist(), self.end.tolist())):
            x[i, self.active[b:e].long()] = 1.0
        return x


class BinaryImages:
    """A set of grey-level images kept by its non-zero pixels, for drawing
    binarized batches: each pixel on with probability (grey level) / 255."""

    def __init__(self, images: torch.Tensor):
        """images: (N, D) uint8 on the CPU."""
        if images.dtype != torch.uint8 or images.dim() != 2 or images.shape[1] > 2 ** 15:
            raise ValueError("BinaryImages needs (N, D) uint8 images with D <= 32768")
        self.x_dim = images.shape[1]
        counts = torch.zeros(len(images), dtype=torch.int64)
        pixels, levels = [], []
        for i in range(0, len(images), 4096):  # in slices: whole-set index temporaries would take 150 MB
            block = images[i:i + 4096]
            nonzero = block != 0
            counts[i:i + 4096] = nonzero.sum(1)
            pixels.append(nonzero.nonzero()[:, 1].to(torch.int16))  # row-major: ascending within a row
            levels.append(block[nonzero])
        self.start = torch.zeros(len(images) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=self.start[1:])
        self.pixel = torch.cat(pixels) if pixels else torch.zeros(0, dtype=torch.int16)
        self.level = torch.cat(levels) if levels else torch.zeros(0, dtype=torch.uint8)
        self.most = int(counts.max()) if len(images) else 0  # non-zero pixels of the fullest image

    def __len__(self) -> int:
        return len(self.start) - 1

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> BinaryBatch:
        """idx: (B,) int64 row indices -> their binarization, from one 63-bit seed drawn from generator."""
        idx = idx.contiguous()
        _check(idx, torch.int64, "idx")
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
        room = len(idx) * self.most
        x = BinaryBatch(torch.empty(room, dtype=torch.int32), torch.empty(len(idx), dtype=torch.int64),
                        torch.empty(len(idx), dtype=torch.int64), torch.empty(self.x_dim + 1, dtype=torch.int64),
                        torch.empty(room, dtype=torch.int32), self.x_dim)
        if _lib().binarize_batch(_p(self.start), _p(self.pixel), _p(self.level), len(self), _p(idx), len(idx),
                                 self.x_dim, seed, _p(x.active), _p(x.begin), _p(x.end), _p(x.pixel_start),
                                 _p(x.rows_of), torch.get_num_threads()):
            raise IndexError(f"row indices must lie in [0, {len(self)})")
        return x


def _check_logits(logits: torch.Tensor, x: BinaryBatch) -> tuple[int, int, int]:
    """Checks logits: (L, rows, D) against the batch x; returns (L, rows, D)."""
    _check_batch(x)
    _check(logits, torch.float32, "logits")
    samples, rows, d = logits.shape
    if rows != len(x) or d != x.x_dim:
        raise ValueError(f"logits {tuple(logits.shape)} do not match a batch of {len(x)} rows of {x.x_dim}")
    return samples, rows, d


def binary_linear(x: BinaryBatch, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x W^T + b for binary x: weight_t: (D, H) = W^T, contiguous; bias: (H,) -> (rows, H)."""
    _check_batch(x)
    _check(weight_t, torch.float32, "weight_t")
    _check(bias, torch.float32, "bias")
    if weight_t.shape[0] != x.x_dim or bias.shape != (weight_t.shape[1],):
        raise ValueError(f"weight_t {tuple(weight_t.shape)} and bias {tuple(bias.shape)} do not fit "
                         f"{x.x_dim} pixels")
    out = torch.empty(len(x), weight_t.shape[1])
    _lib().binary_linear(_p(x.pixel_start), _p(x.rows_of), x.x_dim, len(x), _p(weight_t), _p(bias),
                         weight_t.shape[1], _p(out), torch.get_num_threads())
    return out


def binary_linear_accumulate_(weight_t: torch.Tensor, x: BinaryBatch, dy: torch.Tensor, alpha: float) -> None:
    """weight_t += alpha * X^T dy, in place: weight_t: (D, H) contiguous; dy: (rows, H)."""
    _check_batch(x)
    _check(weight_t, torch.float32, "weight_t")
    dy = dy.contiguous()
    _check(dy, torch.float32, "dy")
    if weight_t.shape[0] != x.x_dim or dy.shape != (len(x), weight_t.shape[1]):
        raise ValueError(f"dy {tuple(dy.shape)} and weight_t {tuple(weight_t.shape)} do not fit a batch of "
                         f"{len(x)} rows of {x.x_dim} pixels")
    _lib().binary_linear_accumulate(_p(x.pixel_start), _p(x.rows_of), x.x_dim, _p(dy), dy.shape[1], alpha,
                                    _p(weight_t), torch.get_num_threads())


def bernoulli_loss_grad_(logits: torch.Tensor, x: BinaryBatch, scale: float) -> float:
    """Sum over logits: (L, rows, D) of softplus(l) - x l, in nats; overwrites
    logits with scale * (sigmoid(l) - x), the gradient of scale times that sum."""
    samples, rows, d = _check_logits(logits, x)
    row_totals = torch.empty(samples * rows, dtype=torch.float64)
    return _lib().bernoulli_loss_grad(_p(logits), samples, _p(x.active), _p(x.begin), _p(x.end), rows, d, scale,
                                      _p(row_totals), torch.get_num_threads())


def bernoulli_log_likelihood(logits: torch.Tensor, x: BinaryBatch) -> torch.Tensor:
    """log p(x | logits) per row: logits: (L, rows, D) -> (L, rows) nats, as
    objectives.bernoulli_log_likelihood (for binary x)."""
    samples, rows, d = _check_logits(logits, x)
    out = torch.empty(samples, rows)
    _lib().bernoulli_log_likelihood(_p(logits), samples, _p(x.active), _p(x.begin), _p(x.end), rows, d, _p(out),
                                    torch.get_num_threads())
    return out


def gaussian_latent(head: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """head: (N, 2 z) = [mu | logvar]; eps: (L, N, z) -> z: (L, N, z), std: (N, z),
    and the KL to N(0, I) summed over the N rows."""
    _check(head, torch.float32, "head")
    _check(eps, torch.float32, "eps")
    samples, rows, zd = eps.shape
    if head.shape != (rows, 2 * zd):
        raise ValueError(f"head {tuple(head.shape)} does not fit eps {tuple(eps.shape)}")
    std, z = torch.empty(rows, zd), torch.empty(samples, rows, zd)
    kl = _lib().gaussian_latent(_p(head), _p(eps), samples, rows, zd, _p(std), _p(z))
    return z, std, kl


def gaussian_latent_backward(dz: torch.Tensor, head: torch.Tensor, eps: torch.Tensor, std: torch.Tensor,
                             kl_weight: float) -> torch.Tensor:
    """d loss / d head: (N, 2 z), given dz = d loss / d z: (L, N, z), for a loss that adds
    kl_weight times the summed KL."""
    dz = dz.contiguous()
    for t, name in ((dz, "dz"), (head, "head"), (eps, "eps"), (std, "std")):
        _check(t, torch.float32, name)
    samples, rows, zd = eps.shape
    if dz.shape != eps.shape or head.shape != (rows, 2 * zd) or std.shape != (rows, zd):
        raise ValueError("dz, head, eps and std do not fit together")
    dhead = torch.empty(rows, 2 * zd)
    _lib().gaussian_latent_backward(_p(dz), _p(head), _p(eps), _p(std), samples, rows, zd, kl_weight, _p(dhead))
    return dhead
