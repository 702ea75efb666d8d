// SHA-256 (FIPS 180-4): the checksums mobizo writes and checks (train.pte, bundle arrays,
// adapter tensors, a checkpoint's files: sums.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mobizo {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t len);
  void update(const std::string& s) { update(s.data(), s.size()); }
  std::string hexdigest();  // finalizes; call once

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(const std::string& data);

}  // namespace mobizo
