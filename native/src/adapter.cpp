#include "adapter.h"

#include <cstring>

#include "fsutil.h"
#include "sha256.h"

namespace mobizo {

static_assert(sizeof(float) == 4, "float32");

static bool little_endian() {
  uint16_t x = 1;
  return *reinterpret_cast<uint8_t*>(&x) == 1;
}

static std::string shape_tuple(const std::vector<int64_t>& shape) {  // Python's str(tuple(shape))
  std::string s = "(";
  for (size_t k = 0; k < shape.size(); ++k) s += (k ? ", " : "") + std::to_string(shape[k]);
  if (shape.size() == 1) s += ",";
  return s + ")";
}

std::string tensors_sha256(const TensorMap& tensors) {
  Sha256 h;
  for (const auto& kv : tensors) {
    h.update(kv.first);
    h.update(std::string("torch.float32"));
    h.update(shape_tuple(kv.second.shape));
    h.update(kv.second.data.data(), kv.second.data.size() * sizeof(float));
  }
  return h.hexdigest();
}

std::string safetensors_bytes(const TensorMap& tensors, Json metadata) {
  if (!little_endian()) throw Error("safetensors writer needs a little-endian CPU");
  metadata.set("sha256", Json::string(tensors_sha256(tensors)));
  Json header = Json::object();
  header.set("__metadata__", std::move(metadata));
  size_t offset = 0;
  for (const auto& kv : tensors) {
    Json t = Json::object();
    t.set("dtype", Json::string("F32"));
    Json shape = Json::array();
    for (int64_t d : kv.second.shape) shape.push(Json::integer(d));
    t.set("shape", shape);
    size_t n = kv.second.data.size() * sizeof(float);
    Json offs = Json::array();
    offs.push(Json::integer(int64_t(offset)));
    offs.push(Json::integer(int64_t(offset + n)));
    t.set("data_offsets", offs);
    header.set(kv.first, t);
    offset += n;
  }
  std::string h = dump_json(header);
  while (h.size() % 8) h += ' ';
  std::string out;
  uint64_t len = h.size();
  for (int k = 0; k < 8; ++k) out += char((len >> (8 * k)) & 0xff);
  out += h;
  for (const auto& kv : tensors)
    out.append(reinterpret_cast<const char*>(kv.second.data.data()), kv.second.data.size() * sizeof(float));
  return out;
}

TensorMap read_safetensors_checked(const std::string& path) {
  std::string bytes = read_file(path);
  auto bad = [&](const std::string& why) { return Error(path + ": unreadable safetensors file (" + why + ")"); };
  if (bytes.size() < 8) throw bad("too short");
  uint64_t len = 0;
  for (int k = 0; k < 8; ++k) len |= uint64_t(static_cast<unsigned char>(bytes[k])) << (8 * k);
  if (len > bytes.size() - 8) throw bad("header length past the end");
  Json header;
  try {
    header = parse_json(bytes.substr(8, len));
  } catch (const JsonError& e) {
    throw bad(e.what());
  }
  if (header.type != Json::Type::Object) throw bad("header is not an object");
  const size_t base = 8 + len;
  TensorMap out;
  std::string want_sha;
  for (const auto& kv : header.o) {
    if (kv.first == "__metadata__") {
      if (const Json* s = kv.second.find("sha256"); s && s->type == Json::Type::String) want_sha = s->s;
      continue;
    }
    try {
      const Json& t = kv.second;
      if (t.at("dtype").as_string("dtype") != "F32") throw bad(kv.first + " is not float32");
      Tensor ten;
      size_t numel = 1;
      for (const auto& d : t.at("shape").a) {
        ten.shape.push_back(d.as_int("shape"));
        numel *= size_t(ten.shape.back());
      }
      const auto& offs = t.at("data_offsets").a;
      if (offs.size() != 2) throw bad("bad data_offsets");
      size_t b = size_t(offs[0].as_int("offset")), e = size_t(offs[1].as_int("offset"));
      if (e < b || e - b != numel * 4 || base + e > bytes.size()) throw bad(kv.first + " has bad data_offsets");
      ten.data.resize(numel);
      std::memcpy(ten.data.data(), bytes.data() + base + b, numel * 4);
      out[kv.first] = std::move(ten);
    } catch (const JsonError& e) {
      throw bad(e.what());
    }
  }
  if (want_sha.empty()) throw Error(path + ": no checksum in the metadata (corrupted, or not written by mobizo)");
  if (want_sha != tensors_sha256(out)) throw Error(path + ": checksum mismatch (the file is corrupted)");
  return out;
}

}  // namespace mobizo
