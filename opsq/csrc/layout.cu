// transform: int8 matrices between row-major and the legacy cuBLASLt tile orders
// (cublasLtOrder_t): col32 (COL32), col_turing (COL4_4R2_8C), col_ampere (COL32_2R_4R4).
// The index formulas are those of opsq/_layouts.py (checked byte for byte against
// cublasLtMatrixTransform's own output in shared/fixtures/cublaslt); offset_of below is the
// per-element statement of them. Padding bytes of a tiled output are zero, whatever the
// padding bytes of a tiled input hold.
//
// Fast path (transform_tiled_kernel): one CTA of 256 threads moves one 64-row x 128-column tile
// of the logical matrix (rows r0 .. r0+63, columns c0 .. c0+127, r0 % 64 == c0 % 128 == 0)
// through shared memory, in two phases separated by __syncthreads:
//
//   load:  the 8 KiB tile is read from the source order into shared memory; every shared
//          byte is written exactly once, with the matrix element or 0 where (r, c) lies
//          outside rows x cols (also when the source holds padding bytes there).
//   store: the tile is written from shared memory in the target order.
//
// Each phase splits the tile into 512 chunks of 16 bytes, two per thread (chunk g = tid and
// g = tid + 256). Which 16 bytes a chunk is depends on the side's order:
//
//   row        chunk g = tile row g / 8, columns 16*(g % 8) .. +15: a warp covers 4 rows x 128
//              contiguous bytes, i.e. whole 128-byte lines of the row-major matrix. Accessed as
//              one 16-byte vector when cols % 16 == 0 and the pointer is 16-byte aligned, else
//              as 4-byte words (cols % 4 == 0) or bytes, with bounds checks (vec_in/vec_out).
//   tiled      In all three tile orders the 64 rows r0 .. r0+63 of a 32-column panel form one
//              contiguous run of 64*32 bytes, at panel*ld + r0*32 (ld = 32 * padded rows;
//              col32: (r>>5)*1024 + (r&31)*32 = r*32; col_turing: (r>>3)*256 = r*32 for r%8 == 0;
//              col_ampere: (r>>5)*1024 = r*32 for r%32 == 0). Chunk g = panel g / 128 of the
//              tile, 16-byte piece q = g % 128 of that run: a warp reads or writes 512
//              contiguous bytes with 16-byte vector accesses. The run is cut at the padded row
//              count (col32: rows, col_turing: rows rounded up to 8, col_ampere: to 32), so the
//              chunks of a tile store cover every padded byte of the output exactly once, and
//              the output needs no memset (at::empty).
//                col32:      q -> row q/2, columns 16*(q%2) .. +15 of the panel (one row).
//                col_ampere: q -> row (q/64)*32 + the row stored at slot (q%64)/2 of the
//                            32x32 tile, columns 16*(q%2) .. +15 (one row).
//                col_turing: q -> 4 rows i0, i0+2, i0+4, i0+6 (i0 = 8*(q/16) + (q/8)%2) x 4
//                            columns 4*(q%8) .. +3: four 4-byte shared-memory words.
//
// Shared memory holds the tile row-major, 128 bytes per row, with the four 32-byte panels of
// row i permuted by XOR with swz(i) = (i ^ ((i >> 2) & 2)) & 3. The 8 threads of a 16-byte
// access phase then hit 8 distinct 16-byte bank groups in every pattern above (a row's 128
// bytes; rows 4k .. 4k+3 of one panel for col32; rows {b, b+1, b+8, b+9} of one panel for
// col_ampere), and the 32 threads of a col_turing word access hit 32 distinct banks.
//
// The grid is (column tiles, row tiles) with grid-stride loops over both, so there is no
// division per element or per tile; all global offsets are 64-bit. When every row-major side
// takes 16-byte vectors (the common case) a separate instantiation without the narrow paths
// runs in 32 registers: 8 CTAs (2048 threads, 64 KiB of shared tiles) per SM. The fast path needs a
// 16-byte aligned tiled source (a freshly allocated or contiguous tensor always is); anything
// else goes through transform_kernel, one thread per element (output zero-initialised).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdint>

#include "checks.h"
#include "ops.h"

namespace opsq {
namespace {

enum Order : int { kRow = 0, kCol32 = 1, kTuring = 2, kAmpere = 3 };

int parse_order(c10::string_view s, const char* name) {
  if (s == "row") return kRow;
  if (s == "col32") return kCol32;
  if (s == "col_turing") return kTuring;
  if (s == "col_ampere") return kAmpere;
  TORCH_CHECK_VALUE(false, std::string(name) +
                               " must be one of ('row', 'col32', 'col_turing', 'col_ampere'), "
                               "got '" + std::string(s) + "'");
  return kRow;
}

// Rows of the padded matrix (the tiled buffer is padded_rows * cols rounded up to 32).
int64_t padded_rows(int order, int64_t rows) {
  switch (order) {
    case kTuring: return ceil_div(rows, 8) * 8;
    case kAmpere: return ceil_div(rows, 32) * 32;
    default: return rows;
  }
}

int64_t tiled_numel(int order, int64_t rows, int64_t cols) {
  if (order == kRow) return rows * cols;
  return padded_rows(order, rows) * (ceil_div(cols, 32) * 32);
}

// ---- per-element fallback ------------------------------------------------------------------

__device__ __forceinline__ int64_t offset_of(int order, int64_t r, int64_t c, int64_t rows,
                                             int64_t cols) {
  if (order == kRow) return r * cols + c;
  const int64_t panel = c >> 5;
  const int64_t j = c & 31;
  if (order == kCol32) return panel * 32 * rows + r * 32 + j;
  if (order == kTuring) {
    const int64_t rows8 = (rows + 7) / 8 * 8;
    const int64_t i = r & 7;
    return panel * 32 * rows8 + (r >> 3) * 256 + (i & 1) * 128 + (j >> 2) * 16 + (i >> 1) * 4 +
           (j & 3);
  }
  const int64_t rows32 = (rows + 31) / 32 * 32;
  const int64_t i = r & 31;
  const int64_t slot = (((i & 7) >> 1) * 4 + (i >> 3)) * 2 + (i & 1);
  return panel * 32 * rows32 + (r >> 5) * 1024 + slot * 32 + j;
}

__global__ void transform_kernel(const int8_t* __restrict__ in, int8_t* __restrict__ out,
                                 int64_t rows, int64_t cols, int from, int to) {
  const int64_t n = rows * cols;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / cols;
    const int64_t c = idx - r * cols;
    out[offset_of(to, r, c, rows, cols)] = in[offset_of(from, r, c, rows, cols)];
  }
}

// ---- tiled fast path (see the comment at the top) ------------------------------------------

constexpr int kTileR = 64;                           // rows per tile: two col_ampere 32x32 tiles
constexpr int kTileC = 128;                          // columns per tile: four 32-column panels
constexpr int kThreads = 256;
constexpr int kChunks = kTileR * kTileC / 16;        // 16-byte chunks per tile (512)
constexpr int kPerThread = kChunks / kThreads;       // 2
constexpr int kPanelChunks = kTileR * 32 / 16;       // chunks per panel of a tile (128)
static_assert(kChunks % kThreads == 0, "chunks must split evenly over the threads");
static_assert(kTileC == 128, "the shared-memory swizzle assumes 4 panels (128 bytes) per row");
static_assert(kTileR % 32 == 0, "a tile must hold whole col_ampere tiles");

struct TileArgs {
  int64_t rows, cols;
  int64_t panels;          // ceil(cols / 32)
  int64_t rows_pad_from;   // padded rows of the source order (tiled sources)
  int64_t rows_pad_to;     // padded rows of the target order (tiled targets)
  int64_t row_tiles;       // ceil(rows / kTileR)
  int64_t col_tiles;       // ceil(cols / kTileC)
  int vec_in, vec_out;     // row-major access width in bytes: 16, 4 or 1
};

// Byte offset of element (i, c) of the tile (0 <= i < 64, 0 <= c < 128) in shared memory.
__device__ __forceinline__ int smem_offset(int i, int c) {
  const int swz = (i ^ ((i >> 2) & 2)) & 3;
  return i * kTileC + (((c >> 5) ^ swz) << 5) + (c & 31);
}

// Number of the `width` bytes starting at column c that lie inside the matrix (0 .. width).
__device__ __forceinline__ int valid_bytes(int64_t cols, int64_t c, int width) {
  const int64_t n = cols - c;
  return n <= 0 ? 0 : (n >= width ? width : static_cast<int>(n));
}

// Keeps the first n (any int) bytes of a little-endian word, zeroes the rest.
__device__ __forceinline__ uint32_t keep_bytes(uint32_t w, int n) {
  if (n >= 4) return w;
  if (n <= 0) return 0u;
  return w & ((1u << (8 * n)) - 1u);
}

__device__ __forceinline__ uint4 keep_bytes(uint4 v, int n) {
  if (n >= 16) return v;
  v.x = keep_bytes(v.x, n);
  v.y = keep_bytes(v.y, n - 4);
  v.z = keep_bytes(v.z, n - 8);
  v.w = keep_bytes(v.w, n - 12);
  return v;
}

// 16 bytes of a row-major row starting at p, of which the first n (0..16) are inside the matrix;
// the others read as 0. vec 16: p is 16-byte aligned and n is 0 or 16; vec 4: p is 4-byte
// aligned and n is a multiple of 4; vec 1: no assumption.
__device__ __forceinline__ uint4 load_row16(const int8_t* p, int n, int vec) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (n <= 0) return v;
  if (vec == 16) return __ldg(reinterpret_cast<const uint4*>(p));
  if (vec == 4) {
    const unsigned int* w = reinterpret_cast<const unsigned int*>(p);
    v.x = __ldg(w);
    if (n > 4) v.y = __ldg(w + 1);
    if (n > 8) v.z = __ldg(w + 2);
    if (n > 12) v.w = __ldg(w + 3);
    return v;
  }
  uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int b = 0; b < 16; ++b) {
    if (b < n) {
      words[b >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(__ldg(p + b))) << (8 * (b & 3));
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// Stores the first n (1..16) bytes of v at p, with the alignment guarantees of load_row16.
__device__ __forceinline__ void store_row16(int8_t* p, uint4 v, int n, int vec) {
  if (vec == 16) {
    *reinterpret_cast<uint4*>(p) = v;
    return;
  }
  if (vec == 4) {
    uint32_t* w = reinterpret_cast<uint32_t*>(p);
    w[0] = v.x;
    if (n > 4) w[1] = v.y;
    if (n > 8) w[2] = v.z;
    if (n > 12) w[3] = v.w;
    return;
  }
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int b = 0; b < 16; ++b) {
    if (b < n) p[b] = static_cast<int8_t>(static_cast<uint8_t>(words[b >> 2] >> (8 * (b & 3))));
  }
}

// Tile row of 16-byte chunk q (0..127) of a panel run, for the one-row orders col32 and
// col_ampere (the chunk holds columns 16*(q&1) .. +15 of that row).
template <int Order>
__device__ __forceinline__ int chunk_row(int q) {
  if (Order == kCol32) return q >> 1;
  // col_ampere: slot s of the 32x32 tile holds row i = 8*((s>>1)&3) + 2*(s>>3) + (s&1), the
  // inverse of slot(i) = (((i&7)>>1)*4 + (i>>3))*2 + (i&1).
  const int s = (q >> 1) & 31;
  return (q >> 6) * 32 + ((s >> 1) & 3) * 8 + (s >> 3) * 2 + (s & 1);
}

// col_turing chunk q (0..127): first row i0 (rows i0, i0+2, i0+4, i0+6) and first column
// (4 columns) inside the panel. Chunk q of the run is bytes 16q .. 16q+15 = 8-row group q>>4,
// row parity (q>>3)&1, column quad q&7; its word k is row i0 + 2k.
// The tile's part of a tiled buffer: in each of its panels (ld = 32 * rows_pad bytes apart),
// one contiguous run from row r0, cut at the padded row count. Chunk g of the tile is chunk q of
// panel p; it exists while the panel does and q < chunks.
struct TiledRun {
  int64_t ld;
  int chunks;
};
__device__ __forceinline__ TiledRun tiled_run(int64_t rows_pad, int64_t r0) {
  const int64_t run = rows_pad - r0;  // > 0: r0 < rows <= rows_pad
  return {32 * rows_pad, 2 * static_cast<int>(run < kTileR ? run : kTileR)};
}

__device__ __forceinline__ int turing_row0(int q) { return (q >> 4) * 8 + ((q >> 3) & 1); }
__device__ __forceinline__ int turing_col0(int q) { return (q & 7) * 4; }

// Load phase: every byte of the shared tile gets the element or 0, exactly once. Vec16: a
// row-major source is read in 16-byte vectors (a.vec_in == 16), compiled without the narrower
// paths.
template <int From, bool Vec16>
__device__ __forceinline__ void load_tile(const int8_t* __restrict__ in, int8_t* smem, int tid,
                                          int64_t r0, int64_t c0, int64_t ct,
                                          const TileArgs& a) {
  uint4 v[kPerThread];
  if (From == kRow) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int g = tid + k * kThreads;
      const int i = g >> 3;
      const int c = (g & 7) * 16;
      const int64_t r = r0 + i;
      const int n = r < a.rows ? valid_bytes(a.cols, c0 + c, 16) : 0;
      v[k] = make_uint4(0u, 0u, 0u, 0u);
      if (n > 0) v[k] = load_row16(in + r * a.cols + c0 + c, n, Vec16 ? 16 : a.vec_in);
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int g = tid + k * kThreads;
      *reinterpret_cast<uint4*>(smem + smem_offset(g >> 3, (g & 7) * 16)) = v[k];
    }
    return;
  }
  const TiledRun tr = tiled_run(a.rows_pad_from, r0);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int g = tid + k * kThreads;
    const int p = g / kPanelChunks;
    const int q = g % kPanelChunks;
    const int64_t panel = ct * (kTileC / 32) + p;
    v[k] = make_uint4(0u, 0u, 0u, 0u);
    if (panel < a.panels && q < tr.chunks) {
      v[k] = __ldg(reinterpret_cast<const uint4*>(in + panel * tr.ld + r0 * 32 + q * 16));
    }
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int g = tid + k * kThreads;
    const int p = g / kPanelChunks;
    const int q = g % kPanelChunks;
    if (From == kTuring) {
      const int i0 = turing_row0(q);
      const int c = p * 32 + turing_col0(q);
      const int n = valid_bytes(a.cols, c0 + c, 4);
      const uint32_t words[4] = {v[k].x, v[k].y, v[k].z, v[k].w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int i = i0 + 2 * w;
        const uint32_t x = r0 + i < a.rows ? keep_bytes(words[w], n) : 0u;
        *reinterpret_cast<uint32_t*>(smem + smem_offset(i, c)) = x;
      }
    } else {
      const int i = chunk_row<From>(q);
      const int c = p * 32 + (q & 1) * 16;
      const uint4 x = r0 + i < a.rows ? keep_bytes(v[k], valid_bytes(a.cols, c0 + c, 16))
                                      : make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(smem + smem_offset(i, c)) = x;
    }
  }
}

// Store phase: row-major targets get the elements inside the matrix; tiled targets get every
// byte of the tile's part of the padded buffer (zeros included). Vec16 as for load_tile.
template <int To, bool Vec16>
__device__ __forceinline__ void store_tile(int8_t* __restrict__ out, const int8_t* smem, int tid,
                                           int64_t r0, int64_t c0, int64_t ct,
                                           const TileArgs& a) {
  if (To == kRow) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int g = tid + k * kThreads;
      const int i = g >> 3;
      const int c = (g & 7) * 16;
      const int64_t r = r0 + i;
      const int n = r < a.rows ? valid_bytes(a.cols, c0 + c, 16) : 0;
      if (n > 0) {
        const uint4 x = *reinterpret_cast<const uint4*>(smem + smem_offset(i, c));
        store_row16(out + r * a.cols + c0 + c, x, n, Vec16 ? 16 : a.vec_out);
      }
    }
    return;
  }
  const TiledRun tr = tiled_run(a.rows_pad_to, r0);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int g = tid + k * kThreads;
    const int p = g / kPanelChunks;
    const int q = g % kPanelChunks;
    const int64_t panel = ct * (kTileC / 32) + p;
    if (panel < a.panels && q < tr.chunks) {
      uint4 x;
      if (To == kTuring) {
        const int i0 = turing_row0(q);
        const int c = p * 32 + turing_col0(q);
        x.x = *reinterpret_cast<const uint32_t*>(smem + smem_offset(i0, c));
        x.y = *reinterpret_cast<const uint32_t*>(smem + smem_offset(i0 + 2, c));
        x.z = *reinterpret_cast<const uint32_t*>(smem + smem_offset(i0 + 4, c));
        x.w = *reinterpret_cast<const uint32_t*>(smem + smem_offset(i0 + 6, c));
      } else {
        const int i = chunk_row<To>(q);
        const int c = p * 32 + (q & 1) * 16;
        x = *reinterpret_cast<const uint4*>(smem + smem_offset(i, c));
      }
      *reinterpret_cast<uint4*>(out + panel * tr.ld + r0 * 32 + q * 16) = x;
    }
  }
}

// Vec16: every row-major side of the launch is accessed in 16-byte vectors (the common case;
// instantiated separately so that it carries none of the 4-byte / 1-byte code and fits in 32
// registers, for 8 CTAs = 2048 threads per SM).
template <int From, int To, bool Vec16>
__global__ void __launch_bounds__(kThreads, Vec16 ? 8 : 6)
    transform_tiled_kernel(const int8_t* __restrict__ in, int8_t* __restrict__ out, TileArgs a) {
  __shared__ uint4 smem_words[kChunks];
  int8_t* smem = reinterpret_cast<int8_t*>(smem_words);
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t rt = blockIdx.y; rt < a.row_tiles; rt += gridDim.y) {
    for (int64_t ct = blockIdx.x; ct < a.col_tiles; ct += gridDim.x) {
      load_tile<From, Vec16>(in, smem, tid, rt * kTileR, ct * kTileC, ct, a);
      __syncthreads();
      store_tile<To, Vec16>(out, smem, tid, rt * kTileR, ct * kTileC, ct, a);
      __syncthreads();  // the next tile overwrites the shared tile
    }
  }
}

using TiledKernel = void (*)(const int8_t*, int8_t*, TileArgs);

template <int From, bool Vec16>
TiledKernel tiled_kernel_to(int to) {
  switch (to) {
    case kRow: return &transform_tiled_kernel<From, kRow, Vec16>;
    case kCol32: return &transform_tiled_kernel<From, kCol32, Vec16>;
    case kTuring: return &transform_tiled_kernel<From, kTuring, Vec16>;
    default: return &transform_tiled_kernel<From, kAmpere, Vec16>;
  }
}

template <bool Vec16>
TiledKernel tiled_kernel_from(int from, int to) {
  switch (from) {
    case kRow: return tiled_kernel_to<kRow, Vec16>(to);
    case kCol32: return tiled_kernel_to<kCol32, Vec16>(to);
    case kTuring: return tiled_kernel_to<kTuring, Vec16>(to);
    default: return tiled_kernel_to<kAmpere, Vec16>(to);
  }
}

// vec16: all row-major sides (if any) take 16-byte vectors. A tiled -> tiled transform has no
// row-major side and always gets the Vec16 kernel.
TiledKernel tiled_kernel(int from, int to, bool vec16) {
  return vec16 ? tiled_kernel_from<true>(from, to) : tiled_kernel_from<false>(from, to);
}

bool aligned_to(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Widest access to a row-major int8 matrix with `cols` columns at p: 16, 4 or 1 bytes.
int row_vec(const void* p, int64_t cols) {
  if (cols % 16 == 0 && aligned_to(p, 16)) return 16;
  if (cols % 4 == 0 && aligned_to(p, 4)) return 4;
  return 1;
}

}  // namespace

at::Tensor transform_cuda(const at::Tensor& A, c10::string_view from_order,
                          c10::string_view to_order, c10::SymIntArrayRef shape) {
  check_dtype("A", A.scalar_type(), {at::kChar});
  check_cuda("A", A);
  const int from = parse_order(from_order, "from_order");
  const int to = parse_order(to_order, "to_order");
  TORCH_CHECK_VALUE(shape.size() == 2,
                    "shape must be [rows, cols], got " + fmt(int64_t(shape.size())) + " sizes");
  const int64_t rows = shape[0].expect_int();
  const int64_t cols = shape[1].expect_int();
  TORCH_CHECK(rows >= 0 && cols >= 0, "shape must have non-negative sizes, got [" + fmt(rows) +
                                          ", " + fmt(cols) + "]");
  if (from == kRow) {
    check_dim("A", A, 2);
    TORCH_CHECK(A.size(0) == rows && A.size(1) == cols,
                "A (row-major) must have shape [" + fmt(rows) + ", " + fmt(cols) + "], got " +
                    fmt_shape(A.sizes()));
  } else {
    check_numel("A", A, tiled_numel(from, rows, cols),
                " (" + std::string(from_order) + " layout of a " + fmt(rows) + "x" + fmt(cols) +
                    " matrix, padding included)");
  }
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor src = A.contiguous();
  at::Tensor out = to == kRow ? at::empty({rows, cols}, A.options())
                              : at::empty({tiled_numel(to, rows, cols)}, A.options());
  const int64_t n = rows * cols;
  if (n == 0) return out;  // a tiled buffer of an empty matrix is empty as well
  const int8_t* in_ptr = src.data_ptr<int8_t>();
  int8_t* out_ptr = out.data_ptr<int8_t>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // The tiled fast path reads and writes tiled buffers in 16-byte vectors.
  const bool fast =
      (from == kRow || aligned_to(in_ptr, 16)) && (to == kRow || aligned_to(out_ptr, 16));
  if (fast) {
    TileArgs a;
    a.rows = rows;
    a.cols = cols;
    a.panels = ceil_div(cols, 32);
    a.rows_pad_from = padded_rows(from, rows);
    a.rows_pad_to = padded_rows(to, rows);
    a.row_tiles = ceil_div(rows, kTileR);
    a.col_tiles = ceil_div(cols, kTileC);
    a.vec_in = from == kRow ? row_vec(in_ptr, cols) : 16;
    a.vec_out = to == kRow ? row_vec(out_ptr, cols) : 16;
    const dim3 grid(static_cast<unsigned int>(std::min<int64_t>(a.col_tiles, INT_MAX)),
                    static_cast<unsigned int>(std::min<int64_t>(a.row_tiles, 65535)));
    const bool vec16 = a.vec_in == 16 && a.vec_out == 16;
    tiled_kernel(from, to, vec16)<<<grid, kThreads, 0, stream>>>(in_ptr, out_ptr, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  // Per-element fallback: it writes only the elements, so the padding is zeroed first.
  if (to != kRow) out.zero_();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, threads), 65535LL * 16);
  transform_kernel<<<blocks, threads, 0, stream>>>(in_ptr, out_ptr, rows, cols, from, to);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace opsq
