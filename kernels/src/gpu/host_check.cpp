// Runs one kernel of kernels.cu on the host over a whole launch grid, for
// the tests: `host_check KERNEL ARGS...`, inputs on stdin and outputs on
// stdout as raw little-endian values (see kernels/src/gpu/host_check.rs).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

template <typename F> static void launch(Dim3 grid, Dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++)
            for (unsigned ty = 0; ty < block.y; ty++)
                for (unsigned tx = 0; tx < block.x; tx++) {
                    blockIdx = {bx, by, 0};
                    threadIdx = {tx, ty, 0};
                    kernel();
                }
}

template <typename T> static std::vector<T> input(size_t n) {
    std::vector<T> v(n);
    if (n && fread(v.data(), sizeof(T), n, stdin) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return v;
}

template <typename T> static void output(const std::vector<T> &v) {
    fwrite(v.data(), sizeof(T), v.size(), stdout);
}

static float float_bits(const char *s) {
    uint32_t u = (uint32_t)strtoul(s, nullptr, 16);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "gram")) {
        int rows = atoi(argv[2]), dim = atoi(argv[3]);
        auto x = input<float>((size_t)rows * dim);
        std::vector<double> out((size_t)dim * (dim + 1) / 2, -1.0);
        unsigned bx = 5, by = 3;
        launch({(dim + bx - 1) / bx, (dim + by - 1) / by, 1}, {bx, by, 1},
               [&] { gram_upper(x.data(), rows, dim, out.data()); });
        output(out);
        return 0;
    }
    if (argc >= 7 && !strcmp(argv[1], "hadamard")) {
        long long rows = atoll(argv[2]);
        int cols = atoi(argv[3]), block = atoi(argv[4]);
        float norm = float_bits(argv[5]);
        int signs_first = atoi(argv[6]);
        auto x = input<float>((size_t)rows * cols);
        auto s = input<float>((size_t)cols);
        unsigned threads = 7;
        long long n = rows * (cols / block);
        launch({(unsigned)((n + threads - 1) / threads), 1, 1}, {threads, 1, 1},
               [&] { hadamard_rows(x.data(), s.data(), rows, cols, block, norm, signs_first); });
        output(x);
        return 0;
    }
    if (argc >= 6 && !strcmp(argv[1], "uniform")) {
        long long n = atoll(argv[2]);
        float inv = float_bits(argv[3]), dz = float_bits(argv[4]);
        long long far_cap = atoll(argv[5]);
        auto x = input<float>((size_t)n);
        std::vector<unsigned char> lo((size_t)n, 0xAA);
        std::vector<unsigned long long> hist(2 * UNIFORM_HIST_R + 1, 0), sums(UNIFORM_OFFSETS, 0);
        std::vector<unsigned int> max_magnitude(1, 0);
        std::vector<int> far((size_t)(far_cap > 0 ? far_cap : 0), 0);
        std::vector<unsigned long long> far_len(1, 0);
        unsigned threads = 9;
        launch({(unsigned)((n + threads - 1) / threads), 1, 1}, {threads, 1, 1}, [&] {
            uniform_tally(x.data(), n, inv, dz, lo.data(), hist.data(), sums.data(),
                          max_magnitude.data(), far.data(), far_len.data(), far_cap);
        });
        output(lo);
        output(hist);
        output(sums);
        output(max_magnitude);
        output(far_len);
        output(far);
        return 0;
    }
    fprintf(stderr, "usage: host_check gram|hadamard|uniform ARGS\n");
    return 2;
}
