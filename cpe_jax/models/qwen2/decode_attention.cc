// One-token (decode) attention over a KV cache for XLA:CPU, as an XLA FFI custom call.
//
// Each row reads only the cache slots its mask allows, so a batch of rows of different lengths
// pays for its own tokens (as paged attention does), not for a window that holds the longest
// row. It computes what `xla_decode_attention` in model.py computes (to float32 rounding):
// float32 scores q.k * d^-0.5, a softmax over the allowed slots, the probabilities rounded to the
// query dtype, p.v accumulated in float32 (values rounded to the query dtype), the result in the
// query dtype; a row with no allowed slot gets zeros. Slots a row may not see are never read, so
// whatever they hold (NaN from a broken row) cannot reach it.
//
// Shapes: q [B, KVH, G, D], k and v [B, KVH, S, D], allowed [B, S] (pred), end [] (int32: the
// newest slot); out [B, KVH, G, D]. Slots are visited oldest first, in ring order from the slot
// after `end`, so a row's sums run in token order wherever its slots lie in a ring cache.
// q/out and k/v are each float32 or bfloat16. The (row, kv head) pairs are split over XLA's
// intra-op threads; the calling thread takes work too, so it never waits for a thread that is
// busy elsewhere.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float bf16_to_f32(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

inline uint16_t f32_to_bf16(float value) {  // round to nearest even, NaN kept a NaN
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if ((word & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((word >> 16) | 0x40u);
  word += 0x7fffu + ((word >> 16) & 1u);
  return static_cast<uint16_t>(word >> 16);
}

template <typename T>
inline float load(const T* p, int64_t i);
template <>
inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float load<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }

template <typename T>
inline void store(T* p, int64_t i, float value);
template <>
inline void store<float>(float* p, int64_t i, float value) { p[i] = value; }
template <>
inline void store<uint16_t>(uint16_t* p, int64_t i, float value) { p[i] = f32_to_bf16(value); }

template <typename T>
inline float round_to(float value);
template <>
inline float round_to<float>(float value) { return value; }
template <>
inline float round_to<uint16_t>(float value) { return bf16_to_f32(f32_to_bf16(value)); }

// exp(x) for x <= 0 (scores minus their maximum) without a libm call, so the loop vectorizes:
// exp(x) = 2^n exp(r) with |r| <= ln(2)/2 and Cephes' degree-6 polynomial (about 1 ulp, as
// XLA:CPU's own exp); below -87 the result is the smallest normal float instead of 0 or a denormal.
inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

struct Dims {
  int64_t b, kvh, g, s, d;
};

// One thread's buffers, reused across the pairs it takes.
struct Scratch {
  std::vector<int32_t> slots;
  std::vector<float> query, scores, block, acc;
};

constexpr int64_t kBlock = 32;  // cache rows converted to float32 at once for p.v

// Attention of the G query heads of (row, kv head) `pair` over the row's allowed slots. kD is the
// head dimension when known at compile time (the common 64 and 128: accumulators then stay in
// registers), else 0 and n.d is used.
template <typename Q, typename C, int64_t kD>
void attend_pair(const Dims& n, int64_t pair, const Q* q, const C* k, const C* v, const bool* allowed,
                 int64_t end, Q* out, Scratch& scratch) {
  const int64_t d = kD > 0 ? kD : n.d, g = n.g;
  const bool* row_allowed = allowed + (pair / n.kvh) * n.s;
  int32_t* slots = scratch.slots.data();
  int64_t count = 0;  // oldest first: from the slot after `end` round to `end`, without branches
  for (int64_t slot = end + 1; slot < n.s; ++slot) {
    slots[count] = static_cast<int32_t>(slot);
    count += row_allowed[slot];
  }
  for (int64_t slot = 0; slot <= end; ++slot) {
    slots[count] = static_cast<int32_t>(slot);
    count += row_allowed[slot];
  }
  Q* out_pair = out + pair * g * d;
  if (count == 0) {
    for (int64_t i = 0; i < g * d; ++i) store(out_pair, i, 0.0f);
    return;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  float* query = scratch.query.data();
  const Q* q_pair = q + pair * g * d;
  for (int64_t i = 0; i < g * d; ++i) query[i] = load(q_pair, i);
  scratch.scores.resize(g * count);
  float* scores = scratch.scores.data();
  float* block = scratch.block.data();
  const C* k_pair = k + pair * n.s * d;
  const C* v_pair = v + pair * n.s * d;

  // Scores, a block of key rows at a time (converted to float32 once for the G heads).
  for (int64_t j0 = 0; j0 < count; j0 += kBlock) {
    const int64_t rows = std::min(kBlock, count - j0);
    for (int64_t r = 0; r < rows; ++r) {
      const C* key_row = k_pair + static_cast<int64_t>(slots[j0 + r]) * d;
      float* dst = block + r * d;
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) dst[e] = load(key_row, e);
    }
    for (int64_t h = 0; h < g; ++h) {
      const float* qh = query + h * d;
      for (int64_t r = 0; r < rows; ++r) {
        const float* key = block + r * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t e = 0; e < d; ++e) dot += key[e] * qh[e];
        scores[h * count + j0 + r] = dot * scale;
      }
    }
  }
  for (int64_t h = 0; h < g; ++h) {
    float* sh = scores + h * count;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < count; ++j) top = sh[j] > top ? sh[j] : top;
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) sh[j] = exp_nonpositive(sh[j] - top);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < count; ++j) total += sh[j];
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) sh[j] = round_to<Q>(sh[j] / total);
  }

  // p.v, a block of value rows at a time; each head's accumulator is one row of `acc`.
  float* acc = scratch.acc.data();
  std::fill(acc, acc + g * d, 0.0f);
  for (int64_t j0 = 0; j0 < count; j0 += kBlock) {
    const int64_t rows = std::min(kBlock, count - j0);
    for (int64_t r = 0; r < rows; ++r) {
      const C* value_row = v_pair + static_cast<int64_t>(slots[j0 + r]) * d;
      float* dst = block + r * d;
      if constexpr (std::is_same_v<Q, C>) {  // a value of the query's dtype is exact already
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) dst[e] = load(value_row, e);
      } else {
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) dst[e] = round_to<Q>(load(value_row, e));
      }
    }
    for (int64_t h = 0; h < g; ++h) {
      const float* ph = scores + h * count + j0;
      float sum[kD > 0 ? kD : 1];
      float* ah = kD > 0 ? sum : acc + h * d;
      if constexpr (kD > 0) std::copy(acc + h * d, acc + (h + 1) * d, sum);
      for (int64_t r = 0; r < rows; ++r) {
        const float p = ph[r];
        const float* value = block + r * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) ah[e] += p * value[e];
      }
      if constexpr (kD > 0) std::copy(sum, sum + d, acc + h * d);
    }
  }
  for (int64_t i = 0; i < g * d; ++i) store(out_pair, i, acc[i]);
}

// Work shared by the calling thread and the pool's: pairs are claimed in chunks from `next`.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;
};

template <typename Q, typename C, int64_t kD>
ffi::Error run(ffi::ThreadPool pool, const Dims& n, const Q* q, const C* k, const C* v, const bool* allowed,
               int64_t end, Q* out) {
  const int64_t pairs = n.b * n.kvh;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads() + 1, pairs));
  const int64_t chunk = std::max<int64_t>(1, pairs / (workers * 4));
  auto work = std::make_shared<Work>();
  auto drain = [=]() {
    if (work->next.load() >= pairs) return;  // a task that started after the work was taken
    Scratch scratch;
    scratch.slots.resize(n.s);
    scratch.query.resize(n.g * n.d);
    scratch.block.resize(kBlock * n.d);
    scratch.acc.resize(n.g * n.d);
    for (;;) {
      const int64_t start = work->next.fetch_add(chunk);
      if (start >= pairs) return;
      const int64_t stop = std::min(pairs, start + chunk);
      for (int64_t pair = start; pair < stop; ++pair) attend_pair<Q, C, kD>(n, pair, q, k, v, allowed, end, out, scratch);
      if (work->done.fetch_add(stop - start) + (stop - start) == pairs) {
        std::lock_guard<std::mutex> lock(work->mutex);
        work->finished.notify_all();
      }
    }
  };
  for (int64_t i = 1; i < workers; ++i) {
    auto task = drain;
    pool.Schedule(std::move(task));
  }
  drain();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == pairs; });
  return ffi::Error::Success();
}

template <typename Q, typename C>
ffi::Error run_for_head_dim(ffi::ThreadPool pool, const Dims& n, const Q* q, const C* k, const C* v,
                            const bool* allowed, int64_t end, Q* out) {
  if (n.d == 64) return run<Q, C, 64>(pool, n, q, k, v, allowed, end, out);
  if (n.d == 128) return run<Q, C, 128>(pool, n, q, k, v, allowed, end, out);
  return run<Q, C, 0>(pool, n, q, k, v, allowed, end, out);
}

bool is_float(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

ffi::Error decode_attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::S32> end_slot,
                            ffi::Result<ffi::AnyBuffer> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), ad = allowed.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || ad.size() != 2 || vd.size() != 4)
    return ffi::Error::InvalidArgument("decode_attention: q, k, v must be rank 4 and allowed rank 2");
  Dims n{qd[0], qd[1], qd[2], kd[2], qd[3]};
  if (kd[0] != n.b || kd[1] != n.kvh || kd[3] != n.d || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      ad[0] != n.b || ad[1] != n.s)
    return ffi::Error::InvalidArgument("decode_attention: q, k, v and allowed shapes disagree");
  if (!is_float(q.element_type()) || !is_float(k.element_type()) || k.element_type() != v.element_type() ||
      out->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("decode_attention: dtypes must be float32 or bfloat16");
  const bool* mask = allowed.typed_data();
  if (end_slot.element_count() != 1) return ffi::Error::InvalidArgument("decode_attention: end must be a scalar");
  if (n.s == 0) {  // no cache slot: every row sees nothing
    std::memset(out->untyped_data(), 0, out->size_bytes());
    return ffi::Error::Success();
  }
  const int64_t end = ((static_cast<int64_t>(end_slot.typed_data()[0]) % n.s) + n.s) % n.s;
  const bool q16 = q.element_type() == ffi::DataType::BF16, c16 = k.element_type() == ffi::DataType::BF16;
  auto qp = [&](auto* tag) { return reinterpret_cast<decltype(tag)>(q.untyped_data()); };
  auto op = [&](auto* tag) { return reinterpret_cast<decltype(tag)>(out->untyped_data()); };
  auto kp = [&](auto* tag) { return reinterpret_cast<const std::remove_pointer_t<decltype(tag)>*>(k.untyped_data()); };
  auto vp = [&](auto* tag) { return reinterpret_cast<const std::remove_pointer_t<decltype(tag)>*>(v.untyped_data()); };
  float* f = nullptr;
  uint16_t* h = nullptr;
  if (!q16 && !c16) return run_for_head_dim<float, float>(pool, n, qp(f), kp(f), vp(f), mask, end, op(f));
  if (!q16 && c16) return run_for_head_dim<float, uint16_t>(pool, n, qp(f), kp(h), vp(h), mask, end, op(f));
  if (q16 && !c16) return run_for_head_dim<uint16_t, float>(pool, n, qp(h), kp(f), vp(f), mask, end, op(h));
  return run_for_head_dim<uint16_t, uint16_t>(pool, n, qp(h), kp(h), vp(h), mask, end, op(h));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CpeDecodeAttention, decode_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
