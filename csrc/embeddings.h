// Token embeddings and their LayerNorm in one pass per token (BERT-family embedding modules).
#pragma once

#include <cstdint>

namespace hf_sparse {

// An embedding table, (rows, n) row-major: float32 rows, or int8 codes times one float32 scale per row (an
// Int8Embedding: its rows are codes * scale, rounded to float32).
struct EmbedTable {
  int64_t rows = 0;
  const float* f32 = nullptr;
  const int8_t* codes = nullptr;
  const float* scale = nullptr;
};

// y[t] = LayerNorm(word[ids[t]] + type[type_id(t)] + position[pos(t)]) * gamma + beta for each token t = (b, s) of
// `batch` sequences of `seq` tokens, in torch's order ((word + type) + position, each sum rounded to float32) and
// with add_layernorm's LayerNorm. Index tensors are int64 read at base + b * sb + s * ss (element strides; 0
// broadcasts).
struct EmbedCall {
  int64_t batch = 0, seq = 0, n = 0;
  const int64_t* ids = nullptr;
  int64_t ids_sb = 0, ids_ss = 0;
  EmbedTable word, position, type;  // type.rows == 0: no token types
  // Positions: pos_ids when given, else RoBERTa's rule from the ids: tokens other than padding_idx count from
  // padding_idx + 1 (plus past) in order, padding tokens get padding_idx.
  const int64_t* pos_ids = nullptr;
  int64_t pos_sb = 0, pos_ss = 0;
  int64_t padding_idx = 0, past = 0;
  // Token types: type_by_position: the type of token t is type_ids[pos(t)] (a buffer indexed by position, as
  // BERT's default token types), else type_ids at (b, s) with the strides.
  const int64_t* type_ids = nullptr;
  int64_t type_sb = 0, type_ss = 0, type_ids_len = 0;
  bool type_by_position = false;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  float eps = 1e-12f;
  float* y = nullptr;  // (batch * seq, n) row-major
};

// An index outside its table: which index tensor ("input_ids", "position_ids", "token_type_ids"), where, what.
struct EmbedError {
  const char* tensor = nullptr;  // null: no error
  int64_t b = 0, s = 0, value = 0, limit = 0;
};

// Runs the call on up to nthreads threads. Every index is checked before its row is read; on a bad one the
// rows of that token and later ones may be left unwritten and the first bad index found is returned.
EmbedError embed_layernorm(const EmbedCall& call, int nthreads);

// Calls so far (tests assert that the fused path ran).
int64_t embed_calls();

}  // namespace hf_sparse
