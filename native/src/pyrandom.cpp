#include "pyrandom.h"

#include <algorithm>
#include <random>
#include <sstream>

namespace mobizo {
namespace {

// SHA-512 round constants and initial hash (FIPS 180-4 4.2.3, 5.3.5)
constexpr uint64_t K[80] = {
    0x428a2f98d728ae22ULL, 0x7137449123ef65cdULL, 0xb5c0fbcfec4d3b2fULL, 0xe9b5dba58189dbbcULL,
    0x3956c25bf348b538ULL, 0x59f111f1b605d019ULL, 0x923f82a4af194f9bULL, 0xab1c5ed5da6d8118ULL,
    0xd807aa98a3030242ULL, 0x12835b0145706fbeULL, 0x243185be4ee4b28cULL, 0x550c7dc3d5ffb4e2ULL,
    0x72be5d74f27b896fULL, 0x80deb1fe3b1696b1ULL, 0x9bdc06a725c71235ULL, 0xc19bf174cf692694ULL,
    0xe49b69c19ef14ad2ULL, 0xefbe4786384f25e3ULL, 0x0fc19dc68b8cd5b5ULL, 0x240ca1cc77ac9c65ULL,
    0x2de92c6f592b0275ULL, 0x4a7484aa6ea6e483ULL, 0x5cb0a9dcbd41fbd4ULL, 0x76f988da831153b5ULL,
    0x983e5152ee66dfabULL, 0xa831c66d2db43210ULL, 0xb00327c898fb213fULL, 0xbf597fc7beef0ee4ULL,
    0xc6e00bf33da88fc2ULL, 0xd5a79147930aa725ULL, 0x06ca6351e003826fULL, 0x142929670a0e6e70ULL,
    0x27b70a8546d22ffcULL, 0x2e1b21385c26c926ULL, 0x4d2c6dfc5ac42aedULL, 0x53380d139d95b3dfULL,
    0x650a73548baf63deULL, 0x766a0abb3c77b2a8ULL, 0x81c2c92e47edaee6ULL, 0x92722c851482353bULL,
    0xa2bfe8a14cf10364ULL, 0xa81a664bbc423001ULL, 0xc24b8b70d0f89791ULL, 0xc76c51a30654be30ULL,
    0xd192e819d6ef5218ULL, 0xd69906245565a910ULL, 0xf40e35855771202aULL, 0x106aa07032bbd1b8ULL,
    0x19a4c116b8d2d0c8ULL, 0x1e376c085141ab53ULL, 0x2748774cdf8eeb99ULL, 0x34b0bcb5e19b48a8ULL,
    0x391c0cb3c5c95a63ULL, 0x4ed8aa4ae3418acbULL, 0x5b9cca4f7763e373ULL, 0x682e6ff3d6b2b8a3ULL,
    0x748f82ee5defb2fcULL, 0x78a5636f43172f60ULL, 0x84c87814a1f0ab72ULL, 0x8cc702081a6439ecULL,
    0x90befffa23631e28ULL, 0xa4506cebde82bde9ULL, 0xbef9a3f7b2c67915ULL, 0xc67178f2e372532bULL,
    0xca273eceea26619cULL, 0xd186b8c721c0c207ULL, 0xeada7dd6cde0eb1eULL, 0xf57d4f7fee6ed178ULL,
    0x06f067aa72176fbaULL, 0x0a637dc5a2c898a6ULL, 0x113f9804bef90daeULL, 0x1b710b35131c471bULL,
    0x28db77f523047d84ULL, 0x32caab7b40c72493ULL, 0x3c9ebe0a15c9bebcULL, 0x431d67c49c100d4cULL,
    0x4cc5d4becb3e42b6ULL, 0x597f299cfc657e2aULL, 0x5fcb6fab3ad6faecULL, 0x6c44198c4a475817ULL};

inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

void sha512_block(uint64_t h[8], const uint8_t* p) {
  uint64_t w[80];
  for (int i = 0; i < 16; ++i) {
    w[i] = 0;
    for (int k = 0; k < 8; ++k) w[i] = (w[i] << 8) | p[8 * i + k];
  }
  for (int i = 16; i < 80; ++i) {
    uint64_t s0 = rotr(w[i - 15], 1) ^ rotr(w[i - 15], 8) ^ (w[i - 15] >> 7);
    uint64_t s1 = rotr(w[i - 2], 19) ^ rotr(w[i - 2], 61) ^ (w[i - 2] >> 6);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint64_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
  for (int i = 0; i < 80; ++i) {
    uint64_t t1 = hh + (rotr(e, 14) ^ rotr(e, 18) ^ rotr(e, 41)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
    uint64_t t2 = (rotr(a, 28) ^ rotr(a, 34) ^ rotr(a, 39)) + ((a & b) ^ (a & c) ^ (b & c));
    hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
  }
  h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

// CPython's _randommodule.c init_by_array (the MT19937 reference seeding by an array of words),
// leaving the state as std::mt19937 reads it: the 624 words, the next call twisting first.
std::mt19937 seeded_by_array(const std::vector<uint32_t>& key) {
  constexpr size_t N = 624;
  uint32_t mt[N];
  mt[0] = 19650218U;
  for (size_t i = 1; i < N; ++i) mt[i] = 1812433253U * (mt[i - 1] ^ (mt[i - 1] >> 30)) + uint32_t(i);
  size_t i = 1, j = 0;
  for (size_t k = std::max(N, key.size()); k; --k) {
    mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525U)) + key[j] + uint32_t(j);
    ++i;
    ++j;
    if (i >= N) {
      mt[0] = mt[N - 1];
      i = 1;
    }
    if (j >= key.size()) j = 0;
  }
  for (size_t k = N - 1; k; --k) {
    mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941U)) - uint32_t(i);
    ++i;
    if (i >= N) {
      mt[0] = mt[N - 1];
      i = 1;
    }
  }
  mt[0] = 0x80000000U;
  std::stringstream state;  // the standard's textual form of the engine: its n state words
  for (size_t k = 0; k < N; ++k) state << mt[k] << ' ';
  std::mt19937 gen;
  state >> gen;
  return gen;
}

}  // namespace

std::string sha512_raw(const std::string& data) {
  uint64_t h[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
                   0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
  std::string m = data;
  const uint64_t bits = uint64_t(data.size()) * 8;
  m += char(0x80);
  while (m.size() % 128 != 112) m += char(0);
  m.append(8, char(0));  // the high 64 bits of the 128-bit length
  for (int k = 7; k >= 0; --k) m += char((bits >> (8 * k)) & 0xff);
  for (size_t off = 0; off < m.size(); off += 128) sha512_block(h, reinterpret_cast<const uint8_t*>(m.data() + off));
  std::string out;
  for (uint64_t v : h)
    for (int k = 7; k >= 0; --k) out += char((v >> (8 * k)) & 0xff);
  return out;
}

std::vector<int64_t> python_shuffled_range(const std::string& seed, int64_t n) {
  // random.seed(str): a = int.from_bytes(s + sha512(s).digest(), "big"); the key is |a| in 32-bit
  // words, least significant first
  std::string bytes = seed + sha512_raw(seed);
  size_t first = 0;  // leading zero bytes add no words
  while (first < bytes.size() && bytes[first] == 0) ++first;
  std::vector<uint32_t> key;
  for (size_t end = bytes.size(); end > first;) {
    uint32_t w = 0;
    for (int k = 0; k < 4 && end > first; ++k) w |= uint32_t(uint8_t(bytes[--end])) << (8 * k);
    key.push_back(w);
  }
  if (key.empty()) key.push_back(0);
  std::mt19937 gen = seeded_by_array(key);
  // Random.shuffle: for i in reversed(range(1, n)): j = _randbelow(i + 1), by rejection over
  // getrandbits(k) with k = (i + 1).bit_length() (k <= 32: the top k bits of one output)
  std::vector<int64_t> x(size_t(n > 0 ? n : 0));
  for (int64_t i = 0; i < n; ++i) x[size_t(i)] = i;
  for (int64_t i = n - 1; i >= 1; --i) {
    uint64_t below = uint64_t(i) + 1;
    int k = 0;
    while ((below >> k) != 0) ++k;
    uint64_t r;
    do r = uint64_t(gen()) >> (32 - k);
    while (r >= below);
    std::swap(x[size_t(i)], x[size_t(r)]);
  }
  return x;
}

std::vector<int64_t> step_indices(int64_t n, int64_t batch_size, int64_t step, int64_t seed) {
  std::vector<int64_t> out;
  int64_t pos = (step - 1) * batch_size;
  int64_t cached_epoch = -1;
  std::vector<int64_t> perm;
  while (int64_t(out.size()) < batch_size) {
    int64_t at = pos + int64_t(out.size());
    int64_t epoch = at / n, off = at % n;
    int64_t take = std::min(batch_size - int64_t(out.size()), n - off);
    if (epoch != cached_epoch) {
      perm = python_shuffled_range("mobizo-data:" + std::to_string(seed) + ":" + std::to_string(epoch), n);
      cached_epoch = epoch;
    }
    out.insert(out.end(), perm.begin() + off, perm.begin() + off + take);
  }
  return out;
}

}  // namespace mobizo
