/* CPU kernels for a VAE on binary images: native.py compiles this file once
 * per machine and calls it through ctypes. C99 with GCC/Clang vector
 * extensions and OpenMP; no Python or torch headers.
 *
 * A binarized batch is kept as the list of its on-pixels (about 100 of 784 per
 * MNIST digit), twice: by row, row i's pixels being active[begin[i] .. end[i])
 * (ascending), and by pixel, pixel p's rows being rows_of[pixel_start[p] ..
 * pixel_start[p+1]) (ascending). Then the first layer's x W^T is a sum of
 * ~100 rows of W^T per image instead of a 784-long dot product per unit, its
 * weight update touches only those rows, and the Bernoulli loss needs no dense
 * x at all. The first layer goes pixel by pixel, so that each row of W^T is
 * read from memory once per batch, not once per image using it.
 *
 * Weights of the first layer are passed as W^T: (D, H), row d holding pixel
 * d's outgoing weights, so every access below is a contiguous row of H floats.
 * Each kernel splits its work over `threads` threads so that every output is
 * computed by one thread in a fixed order: results do not depend on the
 * number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* o[u] += alpha * w[u], u < n: one contiguous row (out of line, so that the
 * compiler vectorises this loop rather than the one over pixels around it). */
static __attribute__((noinline)) void add_row(float *restrict o, const float *restrict w, float alpha, int64_t n)
{
    for (int64_t u = 0; u < n; u++)
        o[u] += alpha * w[u];
}

/* SplitMix64's output function applied to a counter: independent 64-bit words. */
static inline uint64_t mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Binarize the images idx[0..rows) of a dataset stored by its non-zero pixels:
 * image j's are pixel[start[j] .. start[j+1]) (ascending) with grey levels
 * level[...] in 1..255. Pixel on <=> r < ceil(65536 k / 255) for a uniform
 * 16-bit r, as vaelab.data.binarize (exact for k = 255; zero pixels stay off).
 * Row b's r come four to a word from mix64(seed + 2^32 b + w), w = 0, 1, ...
 * Writes row b's on-pixels to active[begin[b] .. end[b]), begin[b] being the
 * number of non-zero pixels of the rows before it, then the same by pixel:
 * pixel_start (d + 1) and rows_of. Returns 0, or -1 (writing nothing) if an
 * index is not in [0, n). */
int binarize_batch(const int64_t *restrict start, const int16_t *restrict pixel,
                    const uint8_t *restrict level, int64_t n_images, const int64_t *restrict idx,
                    int64_t rows, int64_t d, uint64_t seed, int32_t *restrict active, int64_t *restrict begin,
                    int64_t *restrict end, int64_t *restrict pixel_start, int32_t *restrict rows_of,
                    int threads)
{
    for (int64_t b = 0; b < rows; b++)
        if (idx[b] < 0 || idx[b] >= n_images)
            return -1;
    uint32_t threshold[256];
    for (uint32_t k = 0; k < 256; k++)
        threshold[k] = (65536u * k + 254u) / 255u;
    if (rows > 0)
        begin[0] = 0;
    for (int64_t b = 1; b < rows; b++)
        begin[b] = begin[b - 1] + start[idx[b - 1] + 1] - start[idx[b - 1]];
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < rows; b++) {
        uint64_t counter = seed + ((uint64_t)b << 32), word = 0;
        int64_t n = begin[b];
        for (int64_t j = start[idx[b]], k = 0; j < start[idx[b] + 1]; j++, k++) {
            if ((k & 3) == 0)
                word = mix64(counter++);
            uint32_t r = (uint32_t)(word >> (16 * (k & 3))) & 0xFFFFu;
            active[n] = pixel[j];
            n += r < threshold[level[j]];
        }
        end[b] = n;
    }
    /* by pixel: a counting sort, rows ascending within each pixel */
    memset(pixel_start, 0, (size_t)(d + 1) * sizeof(int64_t));
    for (int64_t b = 0; b < rows; b++)
        for (int64_t a = begin[b]; a < end[b]; a++)
            pixel_start[active[a] + 1]++;
    for (int64_t p = 0; p < d; p++)
        pixel_start[p + 1] += pixel_start[p];
    for (int64_t b = 0; b < rows; b++) /* pixel_start[p] runs up to pixel p + 1's start */
        for (int64_t a = begin[b]; a < end[b]; a++)
            rows_of[pixel_start[active[a]]++] = (int32_t)b;
    for (int64_t p = d; p > 0; p--)
        pixel_start[p] = pixel_start[p - 1];
    pixel_start[0] = 0;
    return 0;
}

/* out[i, :] = bias + sum over row i's on-pixels p of weight_t[p, :].  out: (rows, h).
 * Threads own rows of out; each adds every row of weight_t into its rows that use it. */
void binary_linear(const int64_t *restrict pixel_start, const int32_t *restrict rows_of, int64_t d,
                   int64_t rows, const float *restrict weight_t, const float *restrict bias, int64_t h,
                   float *restrict out, int threads)
{
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
#else
        int64_t parts = 1, me = 0;
#endif
        int64_t lo = rows * me / parts, hi = rows * (me + 1) / parts;
        for (int64_t i = lo; i < hi; i++)
            memcpy(out + i * h, bias, (size_t)h * sizeof(float));
        for (int64_t p = 0; p < d; p++)
            for (int64_t k = pixel_start[p]; k < pixel_start[p + 1]; k++)
                if (rows_of[k] >= lo && rows_of[k] < hi)
                    add_row(out + (int64_t)rows_of[k] * h, weight_t + p * h, 1.0f, h);
    }
}

/* weight_t[p, :] += alpha * dy[i, :] for every on-pixel p of every row i:
 * weight_t += alpha X^T dy, the first layer's weight gradient (or SGD step).
 * Threads own pixels, whole rows of weight_t (a thread updating half of every
 * row measured slower than one thread doing it all). */
void binary_linear_accumulate(const int64_t *restrict pixel_start, const int32_t *restrict rows_of,
                              int64_t d, const float *restrict dy, int64_t h, float alpha,
                              float *restrict weight_t, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < d; p++)
        for (int64_t k = pixel_start[p]; k < pixel_start[p + 1]; k++)
            add_row(weight_t + p * h, dy + (int64_t)rows_of[k] * h, alpha, h);
}

/* Eight floats at a time, in GCC/Clang vector extensions: the loss below is
 * vectorised whatever the optimiser's mood (lowered to SSE, AVX or NEON). */
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

static inline f8 select8(i8 mask, f8 yes, f8 no)
{
    return (f8)((mask & (i8)yes) | (~mask & (i8)no));
}

/* exp(t) for t <= 0 (relative error ~2e-7): 2^n p(r), r = t - n ln 2, n = round(t / ln 2). */
static inline f8 exp_nonpositive(f8 t)
{
    const f8 floor = {-87, -87, -87, -87, -87, -87, -87, -87}; /* exp(-87) ~ 1.6e-38: a normal float */
    t = select8(t < floor, floor, t); /* so written, a NaN stays NaN */
    i8 n = __builtin_convertvector(t * 1.44269504f - 0.5f, i8); /* truncation = rounding, as t <= 0 */
    f8 nf = __builtin_convertvector(n, f8);
    f8 r = t - nf * 0.693145752f - nf * 1.42860677e-6f; /* ln 2 in two parts */
    f8 p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f
               + r * (0.00833333377f + r * 0.00138888892f)))));
    return p * (f8)((n + 127) << 23);
}

/* log(1 + e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) in [0, 1/3], by its series (error < 1e-8). */
static inline f8 log1p_unit(f8 e)
{
    f8 s = e / (2.0f + e), s2 = s * s;
    return 2.0f * s * (1.0f + s2 * (0.333333343f + s2 * (0.2f + s2 * (0.142857149f
                   + s2 * (0.111111112f + s2 * (0.0909090936f + s2 * 0.0769230798f))))));
}

/* sum over one row's pixels of softplus(l) - x l, the row's observations being
 * its on-pixels active[0 .. n_on). With grad, also overwrites l with
 * scale * (sigmoid(l) - x). (Inlined with grad constant: two loops, no branch.) */
static inline double bernoulli_row(float *restrict l, int64_t d, const int32_t *restrict active, int64_t n_on,
                                   int grad, float scale)
{
    const f8 zero = {0};
    double on = 0.0;
    for (int64_t a = 0; a < n_on; a++)
        on += l[active[a]];
    f8 softplus = zero;
    for (int64_t p = 0; p < d; p += 8) {
        f8 v = zero;
        int full = d - p >= 8;
        if (full)
            memcpy(&v, l + p, sizeof v);
        else /* a short last block, padded with zeros */
            for (int64_t k = 0; k < d - p; k++)
                v[k] = l[p + k];
        f8 e = exp_nonpositive(select8(v < zero, v, -v)); /* exp(-|v|) */
        f8 term = select8(v > zero, v, zero) + log1p_unit(e);
        f8 g = zero;
        if (grad) {
            f8 q = 1.0f / (1.0f + e); /* sigmoid(|v|) */
            g = scale * select8(v >= zero, q, e * q);
        }
        if (full) {
            softplus += term;
            if (grad)
                memcpy(l + p, &g, sizeof g);
        } else {
            for (int64_t k = 0; k < d - p; k++) {
                softplus[k] += term[k];
                if (grad)
                    l[p + k] = g[k];
            }
        }
    }
    if (grad)
        for (int64_t a = 0; a < n_on; a++)
            l[active[a]] -= scale;
    double total = 0.0;
    for (int k = 0; k < 8; k++)
        total += softplus[k];
    return total - on;
}

/* The Bernoulli term of the negative ELBO and its gradient, in one pass.
 * logits: (samples, rows, d), the decoder's output for each sample of each row;
 * the observations are the on-pixels of the batch (the same for every sample).
 * Returns sum over all of softplus(l) - x l (nats), and overwrites logits
 * with scale * (sigmoid(l) - x). row_totals: room for samples * rows doubles. */
double bernoulli_loss_grad(float *restrict logits, int64_t samples, const int32_t *restrict active,
                           const int64_t *restrict begin, const int64_t *restrict end, int64_t rows,
                           int64_t d, float scale, double *restrict row_totals, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t sr = 0; sr < samples * rows; sr++) {
        int64_t i = sr % rows;
        row_totals[sr] = bernoulli_row(logits + sr * d, d, active + begin[i], end[i] - begin[i], 1, scale);
    }
    double total = 0.0;
    for (int64_t sr = 0; sr < samples * rows; sr++)
        total += row_totals[sr];
    return total;
}

/* log p(x | l) = -(sum of softplus(l) - x l) for each row of logits (samples, rows, d),
 * into out (samples, rows); logits are left as they are. */
void bernoulli_log_likelihood(float *restrict logits, int64_t samples, const int32_t *restrict active,
                              const int64_t *restrict begin, const int64_t *restrict end, int64_t rows,
                              int64_t d, float *restrict out, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t sr = 0; sr < samples * rows; sr++) {
        int64_t i = sr % rows;
        out[sr] = (float)-bernoulli_row(logits + sr * d, d, active + begin[i], end[i] - begin[i], 0, 0.0f);
    }
}

/* The Gaussian latent layer, forward: from head = [mu | logvar] (rows, 2 zd) and
 * eps (samples, rows, zd), writes std = exp(logvar / 2) (rows, zd) and
 * z = mu + std * eps (samples, rows, zd); returns sum over rows of
 * KL(N(mu, std^2) || N(0, I)) = 1/2 sum (mu^2 + std^2 - 1 - logvar). */
double gaussian_latent(const float *restrict head, const float *restrict eps, int64_t samples, int64_t rows,
                       int64_t zd, float *restrict std, float *restrict z)
{
    double kl = 0.0;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < zd; j++) {
            float mu = head[i * 2 * zd + j], logvar = head[i * 2 * zd + zd + j];
            float sd = expf(0.5f * logvar);
            std[i * zd + j] = sd;
            kl += 0.5 * ((double)mu * mu + (double)sd * sd - 1.0 - logvar);
            for (int64_t s = 0; s < samples; s++)
                z[(s * rows + i) * zd + j] = mu + sd * eps[(s * rows + i) * zd + j];
        }
    return kl;
}

/* ... and backward: from dz = d loss / d z (samples, rows, zd), writes
 * dhead = d loss / d [mu | logvar] (rows, 2 zd), the loss being the
 * reconstruction term's plus kl_weight times the summed KL. */
void gaussian_latent_backward(const float *restrict dz, const float *restrict head, const float *restrict eps,
                              const float *restrict std, int64_t samples, int64_t rows, int64_t zd,
                              float kl_weight, float *restrict dhead)
{
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < zd; j++) {
            float dmu = 0.0f, dsd = 0.0f, sd = std[i * zd + j];
            for (int64_t s = 0; s < samples; s++) {
                dmu += dz[(s * rows + i) * zd + j];
                dsd += dz[(s * rows + i) * zd + j] * eps[(s * rows + i) * zd + j];
            }
            dhead[i * 2 * zd + j] = dmu + kl_weight * head[i * 2 * zd + j];
            dhead[i * 2 * zd + zd + j] = 0.5f * sd * dsd + kl_weight * 0.5f * (sd * sd - 1.0f);
        }
}
