// The batch order of mobizo.data.step_indices, reproduced bit for bit: the examples of step s are a
// window of seeded per-epoch permutations, each `random.Random(f"mobizo-data:{seed}:{epoch}").shuffle`
// of range(n) (CPython 3's string seeding: sha512, init_by_array; shuffle by _randbelow over
// getrandbits). MT19937 itself is std::mt19937 (the same generator, specified by the C++ standard);
// only CPython's seeding and its rejection sampling are written out here. Tested against Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mobizo {

// SHA-512 (FIPS 180-4) of `data`: the 64 raw bytes (CPython's str seeding hashes the seed with it).
std::string sha512_raw(const std::string& data);

// random.Random(seed).shuffle(list(range(n))) for a str seed.
std::vector<int64_t> python_shuffled_range(const std::string& seed, int64_t n);

// mobizo.data.step_indices(n, batch_size, step, seed): the example indices of 1-based `step`.
std::vector<int64_t> step_indices(int64_t n, int64_t batch_size, int64_t step, int64_t seed);

}  // namespace mobizo
