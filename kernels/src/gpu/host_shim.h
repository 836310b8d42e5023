// Stands in for CUDA's built-ins so that kernels.cu compiles as host C++
// in the tests: the launch loops set the thread indices and call a kernel
// once per thread, one thread after another (the kernels share no memory
// between threads and never synchronise, so the order does not matter).
#include <climits>
#include <cmath>
#include <math.h>

struct Dim3 {
    unsigned x, y, z;
};
static Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__

static inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
// PTX's cvt.rzi.s32.f32: toward zero, NaN to 0, saturating.
static inline int __float2int_rz(float a) {
    if (a != a) return 0;
    if (a >= 2147483648.0f) return INT_MAX;
    if (a <= -2147483648.0f) return INT_MIN;
    return (int)a;
}
// Atomics: the threads run one after another, so plain operations.
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    unsigned long long old = *p;
    *p = old + v;
    return old;
}
static inline unsigned int atomicMax(unsigned int *p, unsigned int v) {
    unsigned int old = *p;
    if (v > old) *p = v;
    return old;
}
