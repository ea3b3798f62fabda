// The encoder input layer's sparse products, per ISA (included by csrc/isa/isa_body.h inside
// the ISA namespace; see encoder_linear_ops.cpp for the op and its contract).
//
// Both kernels walk the genes in blocks of ``gene_block`` and keep, for every cell, a cursor to
// its first stored entry at or beyond the block (columns ascend within a row). The block's
// weight columns sit transposed in a tile of gene_block x Hp values split by hidden units into
// chunks of ``chunk`` (<= 8) vectors; one chunk of the tile (gene_block x 8 vectors: 64 KiB
// for 128 float genes) stays in cache while every cell's entries of the block use it:
//
//   forward   out[c, chunk] += s_k * tile[col_k - g0, chunk]    accumulators in registers
//   backward  tile[col_k - g0, chunk] += s_k * grad_out[c, chunk]  (grad_out chunk in
//             registers), then the tile is written back transposed into grad_weight[:, g0:g1]
//             with the dense centre term subtracted.


SV_INLINE int64_t enc_block_end(const int64_t* col, int64_t k, int64_t kend, int64_t g1) {
  while (k < kend && col[k] < g1) ++k;
  return k;
}

// Chunk q covers vectors [q * a.chunk, q * a.chunk + width) of a row; its part of the tile
// starts at q * a.chunk * W * gene_block and holds rows of width * W values.
SV_INLINE int64_t enc_chunk_width(int64_t n_vec, int64_t chunk, int64_t q) {
  const int64_t rest = n_vec - q * chunk;
  return rest < chunk ? rest : chunk;
}

// tile <- weight[:, g0:g0+nb] transposed, chunked (see above).
template <class T>
void enc_load_tile(const EncLinearArgs<T>& a, int64_t g0, int64_t nb, T* tile) {
  constexpr int W = Lanes<T>::W;
  const int64_t n_vec = a.Hp / W, GB = a.gene_block;
  for (int64_t h = 0; h < a.Hp; ++h) {
    const int64_t q = h / (a.chunk * W), rw = enc_chunk_width(n_vec, a.chunk, q) * W;
    T* dst = tile + q * a.chunk * W * GB + (h - q * a.chunk * W);
    if (h >= a.H) {
      for (int64_t j = 0; j < nb; ++j) dst[j * rw] = (T)0;
      continue;
    }
    const T* wr = a.weight + h * a.G + g0;
    for (int64_t j = 0; j < nb; ++j) dst[j * rw] = wr[j];
  }
}

template <class T, int NV>
SV_INLINE void enc_fwd_chunk(const EncLinearArgs<T>& a, const T* sub, const int64_t* kb,
                             const int64_t* ke, int64_t g0, int64_t h0, int64_t c0, int64_t c1) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  constexpr int W = L::W;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = kb[c - c0], k1 = ke[c - c0];
    if (k1 == k0) continue;
    T* orow = a.out + c * a.Hp + h0;
    V acc[NV];
    for (int i = 0; i < NV; ++i) acc[i] = L::load(orow + i * W);
    for (int64_t k = k0; k < k1; ++k) {
      const V v = L::splat(a.s[k]);
      const T* t = sub + (a.col[k] - g0) * (NV * W);
      for (int i = 0; i < NV; ++i) acc[i] += v * L::load(t + i * W);
    }
    for (int i = 0; i < NV; ++i) L::store(orow + i * W, acc[i]);
  }
}

template <class T, int NV>
SV_INLINE void enc_bwd_chunk(const EncLinearArgs<T>& a, T* sub, const int64_t* kb,
                             const int64_t* ke, int64_t g0, int64_t h0) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  constexpr int W = L::W;
  for (int64_t c = 0; c < a.C; ++c) {
    const int64_t k0 = kb[c], k1 = ke[c];
    if (k1 == k0) continue;
    const T* drow = a.grad_out + c * a.Hp + h0;
    V d[NV];
    for (int i = 0; i < NV; ++i) d[i] = L::load(drow + i * W);
    for (int64_t k = k0; k < k1; ++k) {
      const V v = L::splat(a.s[k]);
      T* t = sub + (a.col[k] - g0) * (NV * W);
      for (int i = 0; i < NV; ++i) L::store(t + i * W, L::load(t + i * W) + v * d[i]);
    }
  }
}

#define SAMSVAE_ENC_WIDTHS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)

// out[c, :] for cells [c0, c1); tile: gene_block * Hp, cur: 2 * (c1 - c0) scratch.
template <class T>
void enc_linear_forward(const EncLinearArgs<T>& a, T* tile, int64_t* cur, int64_t c0,
                        int64_t c1) {
  constexpr int W = Lanes<T>::W;
  const int64_t G = a.G, GB = a.gene_block, n_vec = a.Hp / W, n = c1 - c0;
  int64_t* kb = cur;
  int64_t* ke = cur + n;
  for (int64_t c = c0; c < c1; ++c) ke[c - c0] = a.crow[c];
  for (int64_t g0 = 0; g0 < G; g0 += GB) {
    const int64_t g1 = g0 + GB < G ? g0 + GB : G;
    bool any = false;
    for (int64_t c = c0; c < c1; ++c) {
      kb[c - c0] = ke[c - c0];
      ke[c - c0] = enc_block_end(a.col, kb[c - c0], a.crow[c + 1], g1);
      any |= ke[c - c0] != kb[c - c0];
    }
    if (!any) continue;
    enc_load_tile<T>(a, g0, g1 - g0, tile);
    for (int64_t q = 0; q * a.chunk < n_vec; ++q) {
      const T* sub = tile + q * a.chunk * W * GB;
      const int64_t h0 = q * a.chunk * W;
      switch (enc_chunk_width(n_vec, a.chunk, q)) {
#define SAMSVAE_ENC_CASE(NV) \
  case NV: enc_fwd_chunk<T, NV>(a, sub, kb, ke, g0, h0, c0, c1); break;
        SAMSVAE_ENC_WIDTHS(SAMSVAE_ENC_CASE)
#undef SAMSVAE_ENC_CASE
      }
    }
  }
}

// grad_weight[:, blocks [b0, b1)]; tile: gene_block * Hp, cur: 2 * C scratch.
template <class T>
void enc_linear_backward(const EncLinearArgs<T>& a, T* tile, int64_t* cur, int64_t b0,
                         int64_t b1) {
  constexpr int W = Lanes<T>::W;
  const int64_t C = a.C, G = a.G, H = a.H, GB = a.gene_block, n_vec = a.Hp / W;
  int64_t* kb = cur;
  int64_t* ke = cur + C;
  for (int64_t c = 0; c < C; ++c) {  // first entry at or beyond this range's first gene
    int64_t lo = a.crow[c], hi = a.crow[c + 1];
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (a.col[mid] < b0 * GB) lo = mid + 1;
      else hi = mid;
    }
    ke[c] = lo;
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t g0 = b * GB, g1 = g0 + GB < G ? g0 + GB : G, nb = g1 - g0;
    for (int64_t c = 0; c < C; ++c) {
      kb[c] = ke[c];
      ke[c] = enc_block_end(a.col, kb[c], a.crow[c + 1], g1);
    }
    std::memset(tile, 0, sizeof(T) * GB * a.Hp);
    for (int64_t q = 0; q * a.chunk < n_vec; ++q) {
      T* sub = tile + q * a.chunk * W * GB;
      const int64_t h0 = q * a.chunk * W;
      switch (enc_chunk_width(n_vec, a.chunk, q)) {
#define SAMSVAE_ENC_CASE(NV) \
  case NV: enc_bwd_chunk<T, NV>(a, sub, kb, ke, g0, h0); break;
        SAMSVAE_ENC_WIDTHS(SAMSVAE_ENC_CASE)
#undef SAMSVAE_ENC_CASE
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t q = h / (a.chunk * W), rw = enc_chunk_width(n_vec, a.chunk, q) * W;
      const T* src = tile + q * a.chunk * W * GB + (h - q * a.chunk * W);
      T* gw = a.grad_weight + h * G + g0;
      const T gs = a.grad_sum[h];
      for (int64_t j = 0; j < nb; ++j) gw[j] = src[j * rw] - gs * a.centre[g0 + j];
    }
  }
}

#undef SAMSVAE_ENC_WIDTHS
