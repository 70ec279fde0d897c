/* Attention of a few query rows over many keys, on the CPU: the decode step's inner loop.
 *
 * PyTorch's CPU flash-attention kernel is built for blocks of many queries; a decode step has a
 * handful of rows per KV head (the GQA group of one token), and there it takes ~2.5x as long as
 * this kernel. Keys come in parts (the sinks, each selected block where the page pool holds it,
 * the window), each part is cut into chunks, one chunk per work item (scores, softmax, weighted
 * values), and all chunks merge by their log-sum-exp, exactly as blockmem/attention/merge.py
 * merges parts.
 *
 * Contract (checked by the Python wrapper, blockmem/attention/kernels/__init__.py), per part:
 *   q    float32 [heads][rows][dim], contiguous
 *   k, v float32 or bfloat16 (is_bf16, the same for all parts): per head, rows of dim contiguous
 *        elements at a fixed stride (see bm_attention)
 *   and for all parts together out float32 [heads][rows][dim], lse float32 [heads][rows]
 *   (natural log of the summed exponentials of the scaled scores);
 *   rows <= BM_MAX_ROWS, dim <= BM_MAX_DIM, parts <= BM_MAX_PARTS, keys >= 1 in every part.
 * Threads come from the OpenMP runtime already loaded with PyTorch (same soname, one pool).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BM_CHUNK 128
#define BM_MAX_ROWS 32
#define BM_MAX_DIM 256
#define BM_MAX_PARTS 4096

int bm_max_rows(void) { return BM_MAX_ROWS; }
int bm_max_dim(void) { return BM_MAX_DIM; }
int bm_max_parts(void) { return BM_MAX_PARTS; }

static inline const float *row_as_float(const void *base, long offset, int is_bf16, int dim, float *buffer) {
    if (!is_bf16) return (const float *)base + offset;
    const uint16_t *src = (const uint16_t *)base + offset;
    for (int d = 0; d < dim; d++) {
        uint32_t bits = (uint32_t)src[d] << 16; /* bfloat16 is the top half of a float32 */
        memcpy(&buffer[d], &bits, sizeof(float));
    }
    return buffer;
}

/* One chunk of one head: partial softmax statistics (max, sum) and unnormalised output. */
static void chunk(const float *q, const void *k, const void *v, int is_bf16, long k_offset, long v_offset,
                  long k_row_stride, long v_row_stride, int rows, int count, int dim, float scale,
                  float *max_out, float *sum_out, float *acc) {
    float scores[BM_MAX_ROWS][BM_CHUNK];
    float buffer[4][BM_MAX_DIM];
    int s = 0;
    /* Four keys at a time: four independent sums per query row keep the FMA units busy (one
       running sum is a chain of dependent additions). */
    for (; s + 4 <= count; s += 4) {
        const float *k0 = row_as_float(k, k_offset + (s + 0) * k_row_stride, is_bf16, dim, buffer[0]);
        const float *k1 = row_as_float(k, k_offset + (s + 1) * k_row_stride, is_bf16, dim, buffer[1]);
        const float *k2 = row_as_float(k, k_offset + (s + 2) * k_row_stride, is_bf16, dim, buffer[2]);
        const float *k3 = row_as_float(k, k_offset + (s + 3) * k_row_stride, is_bf16, dim, buffer[3]);
        for (int r = 0; r < rows; r++) {
            const float *query = q + (long)r * dim;
            float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int d = 0; d < dim; d++) {
                const float x = query[d];
                d0 += x * k0[d], d1 += x * k1[d], d2 += x * k2[d], d3 += x * k3[d];
            }
            scores[r][s] = d0 * scale, scores[r][s + 1] = d1 * scale;
            scores[r][s + 2] = d2 * scale, scores[r][s + 3] = d3 * scale;
        }
    }
    for (; s < count; s++) {
        const float *key = row_as_float(k, k_offset + s * k_row_stride, is_bf16, dim, buffer[0]);
        for (int r = 0; r < rows; r++) {
            const float *query = q + (long)r * dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < dim; d++) dot += query[d] * key[d];
            scores[r][s] = dot * scale;
        }
    }
    for (int r = 0; r < rows; r++) {
        float top = -FLT_MAX, total = 0.0f;
        for (int s = 0; s < count; s++) top = scores[r][s] > top ? scores[r][s] : top;
#pragma omp simd reduction(+ : total)
        for (int s = 0; s < count; s++) {
            scores[r][s] = expf(scores[r][s] - top);
            total += scores[r][s];
        }
        max_out[r] = top;
        sum_out[r] = total;
    }
    memset(acc, 0, sizeof(float) * rows * dim);
    for (s = 0; s + 2 <= count; s += 2) { /* two values per pass over the accumulators */
        const float *v0 = row_as_float(v, v_offset + s * v_row_stride, is_bf16, dim, buffer[0]);
        const float *v1 = row_as_float(v, v_offset + (s + 1) * v_row_stride, is_bf16, dim, buffer[1]);
        for (int r = 0; r < rows; r++) {
            const float p0 = scores[r][s], p1 = scores[r][s + 1];
            float *target = acc + (long)r * dim;
#pragma omp simd
            for (int d = 0; d < dim; d++) target[d] += p0 * v0[d] + p1 * v1[d];
        }
    }
    for (; s < count; s++) {
        const float *value = row_as_float(v, v_offset + s * v_row_stride, is_bf16, dim, buffer[0]);
        for (int r = 0; r < rows; r++) {
            const float p = scores[r][s];
            float *target = acc + (long)r * dim;
#pragma omp simd
            for (int d = 0; d < dim; d++) target[d] += p * value[d];
        }
    }
}

/* Attention of `parts` key sets merged into one softmax over their union. Part i has its own
 * queries q[i] (a part may hold keys at other positions, so its query is rotated differently) and
 * keys[i] keys; head h of part i reads keys from k[i * heads + h] and values from v[i * heads + h]
 * (the address of its first row), rows row_strides[2i] and row_strides[2i + 1] elements apart. A
 * part can thus be a block of a page pool, wherever each head's copy of it lies. Returns 0 on
 * success, -1 when the shapes break the contract, -2 when scratch memory is short. */
int bm_attention(int parts, int heads, int rows, int dim, float scale, int is_bf16, const float *const *q,
                 const void *const *k, const void *const *v, const long *row_strides, const int *keys,
                 float *out, float *lse, int threads) {
    if (parts < 1 || parts > BM_MAX_PARTS || rows < 1 || rows > BM_MAX_ROWS || dim < 1 || dim > BM_MAX_DIM ||
        heads < 1)
        return -1;
    int *first_item = malloc(sizeof(int) * (parts + 1));
    int *chunks = malloc(sizeof(int) * parts);
    if (!first_item || !chunks) {
        free(first_item), free(chunks);
        return -2;
    }
    first_item[0] = 0;
    for (int i = 0; i < parts; i++) {
        if (keys[i] < 1) {
            free(first_item), free(chunks);
            return -1;
        }
        chunks[i] = (keys[i] + BM_CHUNK - 1) / BM_CHUNK;
        first_item[i + 1] = first_item[i] + heads * chunks[i];
    }
    const int items = first_item[parts];
    float *maxes = malloc(sizeof(float) * items * rows);
    float *sums = malloc(sizeof(float) * items * rows);
    float *accs = malloc(sizeof(float) * (size_t)items * rows * dim);
    if (!maxes || !sums || !accs) {
        free(maxes), free(sums), free(accs), free(first_item), free(chunks);
        return -2;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int item = 0; item < items; item++) {
        int lo = 0, hi = parts - 1; /* the part holding this item: first_item[i] <= item < first_item[i + 1] */
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (first_item[mid] <= item) lo = mid; else hi = mid - 1;
        }
        const int i = lo, local = item - first_item[i];
        const int h = local / chunks[i], c = local % chunks[i];
        const long k_row = row_strides[2 * i], v_row = row_strides[2 * i + 1];
        const int start = c * BM_CHUNK;
        const int count = keys[i] - start < BM_CHUNK ? keys[i] - start : BM_CHUNK;
        chunk(q[i] + (long)h * rows * dim, k[i * heads + h], v[i * heads + h], is_bf16, start * k_row, start * v_row,
              k_row, v_row, rows, count, dim, scale, maxes + (long)item * rows, sums + (long)item * rows,
              accs + (long)item * rows * dim);
    }
    /* Merge every chunk of every part of a head by its log-sum-exp. */
    for (int h = 0; h < heads; h++) {
        for (int r = 0; r < rows; r++) {
            float top = -FLT_MAX, total = 0.0f;
            for (int i = 0; i < parts; i++)
                for (int c = 0; c < chunks[i]; c++) {
                    const float m = maxes[(long)(first_item[i] + h * chunks[i] + c) * rows + r];
                    top = m > top ? m : top;
                }
            float *target = out + ((long)h * rows + r) * dim;
            memset(target, 0, sizeof(float) * dim);
            for (int i = 0; i < parts; i++)
                for (int c = 0; c < chunks[i]; c++) {
                    const long at = (long)(first_item[i] + h * chunks[i] + c) * rows + r;
                    const float weight = expf(maxes[at] - top);
                    total += sums[at] * weight;
                    const float *acc = accs + at * dim;
#pragma omp simd
                    for (int d = 0; d < dim; d++) target[d] += weight * acc[d];
                }
            const float inverse = 1.0f / total;
            for (int d = 0; d < dim; d++) target[d] *= inverse;
            lse[h * rows + r] = top + logf(total);
        }
    }
    free(maxes), free(sums), free(accs), free(first_item), free(chunks);
    return 0;
}
