/* k_quant's per-block search in C: the same float32 operations, in the same order, as the numpy
 * reference in onnxforge/quant/kquant.py, so both give the same bytes. Loaded with ctypes, which
 * releases the GIL around the call: threads quantize in parallel.
 *
 * Exactness rules: float32 everywhere, no contraction into FMA (-ffp-contract=off), no fast-math;
 * every block sum is kquant.tsum's halving tree (t[i] + t[i + n/2], then again on the first half),
 * which is also what 8-lane vectors compute when the halves are whole vectors and then vector
 * halves; floor is exact for the clamped ranges used here. Blocks are independent, so any split of
 * the rows gives the same result.
 *
 * GCC/Clang vector extensions (8 floats): on x86-64 the kernel is compiled for AVX2 and runs only
 * where the CPU has it (the exported functions return -1 elsewhere, and Python runs the numpy
 * reference); other targets lower the vectors to what they have. Any width computes the same sums
 * in the same order.
 */
#include <float.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define X86 1
#pragma GCC push_options
#pragma GCC target("avx2")
#else
#define X86 0
#endif

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define INL static inline __attribute__((always_inline))
#define MAXV 32 /* 256 floats */

INL vf splat(float a) { return (vf){a, a, a, a, a, a, a, a}; }
INL vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INL vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); } /* m ? a : b per lane */
INL vf vmin(vf a, vf b) { return sel(a < b, a, b); }
INL vf vmax(vf a, vf b) { return sel(a > b, a, b); }

INL float hsum(vf a) { /* the last three levels of the tree, inside one vector */
    a = a + __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 0, 0, 0);
    a = a + __builtin_shufflevector(a, a, 2, 3, 0, 0, 0, 0, 0, 0);
    a = a + __builtin_shufflevector(a, a, 1, 0, 0, 0, 0, 0, 0, 0);
    return a[0];
}

INL float tsum(vf *t, const int V) { /* destroys t */
    for (int h = V >> 1; h >= 1; h >>= 1)
        for (int i = 0; i < h; i++) t[i] = t[i] + t[i + h];
    return hsum(t[0]);
}

INL float recip(float s) { /* onnxforge.quant.types.reciprocal */
    float a = s < 0 ? -s : s;
    return a >= FLT_MIN ? 1.0f / s : 0.0f;
}

/* clip(floor(v), lo, hi) for integers lo, hi: clamp to [lo - 1, hi + 1] first (same result, and
 * inf fits), then floor exactly through a truncating conversion */
INL vf floor_clip(vf v, float lo, float hi) {
    v = vmin(vmax(v, splat(lo - 1.0f)), splat(hi + 1.0f));
    vf t = __builtin_convertvector(__builtin_convertvector(v, vi), vf);
    t = t - (vf)((t > v) & (vi)splat(1.0f));
    return vmin(vmax(t, splat(lo)), splat(hi));
}

/* round_levels(x, s, zp) - zp */
INL void levels_of(const vf *x, const int V, float s, float zp, float qmax, vf *lev) {
    vf r = splat(recip(s)), z = splat(zp), half = splat(0.5f);
    for (int i = 0; i < V; i++) {
        vf v = x[i] * r;
        v = v + z;
        v = v + half;
        lev[i] = floor_clip(v, 0.0f, qmax) - z;
    }
}

/* _ls_scale: weighted least-squares scale for levels lev, and its score */
INL float ls_scale(const vf *wx, const vf *wt, const vf *lev, const int V, float *score) {
    vf t1[MAXV], t2[MAXV];
    for (int i = 0; i < V; i++) {
        t1[i] = wx[i] * lev[i];
        t2[i] = wt[i] * (lev[i] * lev[i]);
    }
    float slx = tsum(t1, V), sl2 = tsum(t2, V);
    float s = sl2 > 0 ? slx / sl2 : 0.0f;
    *score = s * slx;
    return s;
}

/* loads the block; importance |x| + rms(x) and wt * x; min and max */
INL void prepare(const float *xb, const int V, vf *x, vf *wt, vf *wx, float *mn, float *mx) {
    vf t[MAXV], lo, hi;
    for (int i = 0; i < V; i++) {
        x[i] = load(xb + 8 * i);
        t[i] = x[i] * x[i];
    }
    float rms = __builtin_sqrtf(tsum(t, V) / (float)(8 * V));
    lo = hi = x[0];
    for (int i = 0; i < V; i++) {
        wt[i] = sel(x[i] < 0, -x[i], x[i]) + splat(rms);
        wx[i] = wt[i] * x[i];
        lo = vmin(lo, x[i]);
        hi = vmax(hi, x[i]);
    }
    float a = lo[0], b = hi[0];
    for (int j = 1; j < 8; j++) {
        a = lo[j] < a ? lo[j] : a;
        b = hi[j] > b ? hi[j] : b;
    }
    *mn = a, *mx = b;
}

INL void write_levels(const vf *x, const int V, float s, float zp, float qmax, uint8_t *out) {
    vf lev[MAXV];
    levels_of(x, V, s, zp, qmax, lev);
    for (int i = 0; i < V; i++)
        for (int j = 0; j < 8; j++) out[8 * i + j] = (uint8_t)(lev[i][j] + zp);
}

__attribute__((noinline)) static void symmetric_blocks(const float *x, int64_t nblocks, const int V, int bits, const float *grid, int ngrid,
                          int lloyd, float *scales, uint8_t *levels) {
    const float nmax = (float)(1 << (bits - 1)), qmax = (float)((1 << bits) - 1);
    vf xs[MAXV], wt[MAXV], wx[MAXV], lev[MAXV];
    for (int64_t b = 0; b < nblocks; b++) {
        float lo, hi, best, sc;
        prepare(x + b * 8 * V, V, xs, wt, wx, &lo, &hi);
        float m = (hi < 0 ? -hi : hi) > (lo < 0 ? -lo : lo) ? hi : lo; /* signed_absmax: ties go to lo */
        float inv_m = recip(m);
        levels_of(xs, V, m / -nmax, nmax, qmax, lev);
        float best_s = ls_scale(wx, wt, lev, V, &best);
        for (int g = 0; g < ngrid; g++) {
            vf c = splat(-(nmax + grid[g]) * inv_m), half = splat(0.5f);
            for (int i = 0; i < V; i++) lev[i] = floor_clip(xs[i] * c + half, -nmax, nmax - 1.0f);
            float s = ls_scale(wx, wt, lev, V, &sc);
            if (sc > best) best_s = s, best = sc;
        }
        for (int r = 0; r < lloyd; r++) {
            levels_of(xs, V, best_s, nmax, qmax, lev);
            float s = ls_scale(wx, wt, lev, V, &sc);
            if (sc > best) best_s = s, best = sc;
        }
        scales[b] = best_s;
        write_levels(xs, V, best_s, nmax, qmax, levels + b * 8 * V);
    }
}

__attribute__((noinline)) static void asymmetric_blocks(const float *x, int64_t nblocks, const int V, int bits, const float *grid, int ngrid,
                           int lloyd, float *scales, float *zps, uint8_t *levels) {
    const float qmax = (float)((1 << bits) - 1);
    vf xs[MAXV], wt[MAXV], wx[MAXV], lev[MAXV], t[MAXV];
    for (int64_t b = 0; b < nblocks; b++) {
        float mn, mx, best, sc;
        prepare(x + b * 8 * V, V, xs, wt, wx, &mn, &mx);
        memcpy(t, wt, sizeof(vf) * V);
        float sw = tsum(t, V);
        memcpy(t, wx, sizeof(vf) * V);
        float swx = tsum(t, V);
        float lo = mn < 0 ? mn : 0.0f, hi = mx > 0 ? mx : 0.0f;
        float s0 = (hi - lo) / qmax; /* RTN start: asymmetric_scale_zp */
        float zp0 = floor_clip(splat((s0 != 0 ? -lo / s0 : 0.0f) + 0.5f), 0.0f, qmax)[0];
        levels_of(xs, V, s0, zp0, qmax, lev);
        float best_s = ls_scale(wx, wt, lev, V, &best), best_zp = zp0;
        float inv_rng = recip(hi - lo);
        for (int g = 0; g < ngrid; g++) {
            float iscale = (qmax + grid[g]) * inv_rng;
            vf t1[MAXV], t2[MAXV], t3[MAXV], is = splat(iscale), vlo = splat(lo), half = splat(0.5f);
            for (int i = 0; i < V; i++) {
                vf l = floor_clip((xs[i] - vlo) * is + half, 0.0f, qmax);
                t1[i] = wt[i] * l;
                t2[i] = wt[i] * (l * l);
                t3[i] = wx[i] * l;
            }
            float swl = tsum(t1, V), swl2 = tsum(t2, V), swlx = tsum(t3, V);
            float det = sw * swl2 - swl * swl;
            int ok = det > (1e-12f * sw) * swl2;
            float a = ok ? (sw * swlx - swx * swl) / det : 0.0f;
            float bb = ok ? (swl2 * swx - swl * swlx) / det : 0.0f;
            ok = ok && a > 0;
            float s_fit = ok ? a : recip(iscale);
            float zp = ok ? -bb * recip(s_fit) : -lo * iscale;
            zp = floor_clip(splat(zp + 0.5f), 0.0f, qmax)[0];
            levels_of(xs, V, s_fit, zp, qmax, lev);
            float s = ls_scale(wx, wt, lev, V, &sc);
            if (sc > best) best_s = s, best_zp = zp, best = sc;
        }
        for (int r = 0; r < lloyd; r++) {
            levels_of(xs, V, best_s, best_zp, qmax, lev);
            float s = ls_scale(wx, wt, lev, V, &sc);
            if (sc > best) best_s = s, best = sc;
        }
        scales[b] = best_s;
        zps[b] = best_zp;
        write_levels(xs, V, best_s, best_zp, qmax, levels + b * 8 * V);
    }
}

#if X86
#pragma GCC pop_options
#endif

static int supported(void) {
#if X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 1;
#endif
}

int kquant_supported(void) { return supported(); }

#define BY_SIZE(call)                                                                                  \
    switch (n) {                                                                                       \
    case 16: call(2); break;                                                                           \
    case 32: call(4); break;                                                                           \
    case 64: call(8); break;                                                                           \
    case 128: call(16); break;                                                                         \
    default: call(32); break;                                                                          \
    }

/* x: nblocks x n floats (n a power of two, 16..256). Writes scales[nblocks] and levels[nblocks x n]
 * (unsigned, zero point 2^(bits-1)). Returns 0, or -1 when this CPU cannot run the kernel. */
int kquant_symmetric(const float *x, int64_t nblocks, int n, int bits, const float *grid, int ngrid, int lloyd,
                     float *scales, uint8_t *levels) {
    if (!supported()) return -1;
#define SYM(V) symmetric_blocks(x, nblocks, V, bits, grid, ngrid, lloyd, scales, levels)
    BY_SIZE(SYM)
    return 0;
}

/* Asymmetric: also writes the integer zero points zps[nblocks] (as float). */
int kquant_asymmetric(const float *x, int64_t nblocks, int n, int bits, const float *grid, int ngrid, int lloyd,
                      float *scales, float *zps, uint8_t *levels) {
    if (!supported()) return -1;
#define ASYM(V) asymmetric_blocks(x, nblocks, V, bits, grid, ngrid, lloyd, scales, zps, levels)
    BY_SIZE(ASYM)
    return 0;
}

/* The file is built as an extension module only so that pip compiles it; Python never imports it
 * (ctypes loads it). Windows links extension modules with /EXPORT:PyInit__kquant, so one must exist. */
#if defined(_WIN32)
__declspec(dllexport)
#endif
void *PyInit__kquant(void) { return 0; }
