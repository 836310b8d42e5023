// The hot kernels of hcx-cluster for NVIDIA GPUs, compiled at run time by
// NVRTC (with --fmad=false) through cudarc. Every kernel repeats the CPU
// path's arithmetic operation for operation, so a GPU node writes the same
// bytes as a CPU node:
//
// * gram_upper: one thread an entry (i, j), i <= j, of X^T X in f64, summed
//   over the rows in row order from zero (kernels/src/gram.rs). The
//   products of two f32 values are exact in f64, so the fused multiply-add
//   gives the bits of a multiply and an add. Out: the packed upper
//   triangle, column j at j(j+1)/2, row i within it.
// * hadamard_rows: one thread a block of `block` values of one row: the
//   column signs (before the transform going forward, after it going back),
//   the butterflies stage by stage, then the scale 1/sqrt(block) the host
//   computed (kernels/src/hadamard.rs).
// * uniform_tally: `uniform`'s quantizing pass (kernels/src/uniform.rs,
//   `quantize_pass`): each value's code q = floor(|x|·inv + 1/2 − dz)
//   clamped at 0 with x's sign, its low byte, and the pass's integer tally
//   (the codes' histogram, the codes beyond it, the offset sums in units of
//   2^-24, the largest magnitude) through atomic integer additions, whose
//   result does not depend on the threads' order.
//
// The file is also compiled by the host's C++ compiler in the tests, with a
// header that stands in for CUDA's thread indices, so the indexing and the
// arithmetic are checked against the CPU path on machines without a GPU.

extern "C" __global__ void gram_upper(const float *__restrict__ x, int rows, int dim,
                                      double *__restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int j = blockIdx.y * blockDim.y + threadIdx.y;
    if (i >= dim || j >= dim || i > j) {
        return;
    }
    double g = 0.0;
    for (int r = 0; r < rows; r++) {
        const float *row = x + (long long)r * dim;
        g = __fma_rn((double)row[i], (double)row[j], g);
    }
    out[(long long)j * (j + 1) / 2 + i] = g;
}

extern "C" __global__ void hadamard_rows(float *__restrict__ x, const float *__restrict__ signs,
                                         long long rows, int cols, int block, float norm,
                                         int signs_first) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long per_row = cols / block;
    if (t >= rows * per_row) {
        return;
    }
    long long r = t / per_row;
    int c0 = (int)(t % per_row) * block;
    float *v = x + r * cols + c0;
    const float *s = signs + c0;
    if (signs_first) {
        for (int k = 0; k < block; k++) {
            v[k] = __fmul_rn(v[k], s[k]);
        }
    }
    for (int h = 1; h < block; h *= 2) {
        for (int start = 0; start < block; start += 2 * h) {
            for (int k = start; k < start + h; k++) {
                float p = v[k];
                float q = v[k + h];
                v[k] = __fadd_rn(p, q);
                v[k + h] = __fsub_rn(p, q);
            }
        }
    }
    for (int k = 0; k < block; k++) {
        v[k] = __fmul_rn(v[k], norm);
    }
    if (!signs_first) {
        for (int k = 0; k < block; k++) {
            v[k] = __fmul_rn(v[k], s[k]);
        }
    }
}

// The constants of kernels/src/uniform.rs.
#define UNIFORM_HIST_R 512
#define UNIFORM_OFFSETS 8

extern "C" __global__ void uniform_tally(const float *__restrict__ x, long long n, float inv,
                                         float dz, unsigned char *__restrict__ lo,
                                         unsigned long long *__restrict__ hist,
                                         unsigned long long *__restrict__ sums,
                                         unsigned int *__restrict__ max_magnitude,
                                         int *__restrict__ far, unsigned long long *__restrict__ far_len,
                                         long long far_cap) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) {
        return;
    }
    float v = x[t];
    float scaled = __fmul_rn(fabsf(v), inv);
    float a = __fsub_rn(__fadd_rn(scaled, 0.5f), dz);
    // fmaxf returns 0 for a NaN, as the CPU's max does; the conversion
    // truncates toward zero and saturates, as Rust's `as i32` does.
    int m = __float2int_rz(fmaxf(a, 0.0f));
    int q = v < 0.0f ? -m : m;
    lo[t] = (unsigned char)(q & 0xff);
    if (m >= 1 && m <= UNIFORM_OFFSETS) {
        // |x|/Δ in units of 2^-24: exact for these magnitudes.
        long long units = __float2int_rz(__fmul_rn(scaled, 16777216.0f));
        atomicAdd(&sums[m - 1], (unsigned long long)units);
    }
    if (m <= UNIFORM_HIST_R) {
        atomicAdd(&hist[q + UNIFORM_HIST_R], 1ULL);
    } else {
        unsigned long long at = atomicAdd(far_len, 1ULL);
        if ((long long)at < far_cap) {
            far[at] = q;
        }
    }
    atomicMax(max_magnitude, (unsigned int)m);
}
