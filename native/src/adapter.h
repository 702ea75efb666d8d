// PEFT adapters as mobizo.checkpoint writes them: adapter_config.json + adapter_model.safetensors
// with keys "base_model.model.<module>.lora_A.weight" / ".lora_B.weight" (float32) and metadata
// {"format": "pt", "sha256": tensors_sha256, "r", "lora_alpha", "writer": "mobizo"}.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "json.h"

namespace mobizo {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

using TensorMap = std::map<std::string, Tensor>;  // sorted by key, like Python's sorted()

// mobizo.checkpoint.tensors_sha256: for each key in sorted order, sha256 over the key,
// "torch.float32", str(tuple(shape)) and the raw little-endian bytes.
std::string tensors_sha256(const TensorMap& tensors);

// The bytes of a safetensors file (8-byte LE header length, JSON header padded with spaces to
// a multiple of 8, raw data) holding `tensors` and `metadata` (sha256 added here).
std::string safetensors_bytes(const TensorMap& tensors, Json metadata);

// Read a safetensors file written by mobizo (float32 only) and verify its sha256 metadata.
TensorMap read_safetensors_checked(const std::string& path);

}  // namespace mobizo
