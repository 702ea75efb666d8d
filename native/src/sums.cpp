#include "sums.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <set>
#include <vector>

#include "fsutil.h"
#include "sha256.h"

namespace mobizo {

const char* const SUMS = "SHA256SUMS";

// mobizo.checkpoint.CHECKPOINT_FILES: what a checkpoint may hold
static const char* const CHECKPOINT_FILES[] = {"state.json",           "adapter_config.json", "adapter_model.safetensors",
                                               "zo_state.safetensors", "rollback.safetensors", "optimizer.pt"};

std::string file_sha256(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_errno("cannot read", path);
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (true) {
    ssize_t n = read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      close(fd);
      errno = e;
      throw_errno("cannot read", path);
    }
    if (n == 0) break;
    h.update(buf.data(), size_t(n));
  }
  close(fd);
  return h.hexdigest();
}

void write_sums(const std::string& dir) {
  std::string text;
  for (const auto& name : list_dir(dir))  // sorted
    if (name != SUMS && is_file(join(dir, name))) text += file_sha256(join(dir, name)) + "  " + name + "\n";
  write_file_synced(join(dir, SUMS), text);
}

static bool hex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

bool read_sums(const std::string& dir, Sums* out) {
  const std::string path = join(dir, SUMS);
  if (!exists(path)) return false;
  std::string text = read_file(path);
  if (text.empty() || text.back() != '\n') throw Error(path + ": truncated (the file is corrupted)");
  out->clear();
  size_t n = 0;
  for (size_t at = 0; at < text.size();) {
    size_t end = text.find('\n', at);
    std::string line = text.substr(at, end - at);
    at = end + 1;
    ++n;
    // "<hex>  <name>" (or "<hex> *<name>", sha256sum's binary mode); a plain name: no '/', '\', NUL
    std::string name = line.size() > 66 ? line.substr(66) : "";
    bool ok = line.size() > 66 && hex64(line.substr(0, 64)) && line[64] == ' ' && (line[65] == ' ' || line[65] == '*') &&
              name.find_first_of(std::string("/\\\0", 3)) == std::string::npos && !out->count(name);
    if (!ok) throw Error(path + ": malformed line " + std::to_string(n) + " (the file is corrupted)");
    (*out)[name] = line.substr(0, 64);
  }
  return true;
}

void check_listed(const std::string& dir, const Sums& sums, const std::string& name) {
  const std::string path = join(dir, name);
  auto it = sums.find(name);
  if (it == sums.end()) throw Error(join(dir, SUMS) + ": " + name + " is not listed (the file is corrupted)");
  if (!is_file(path)) throw Error(path + ": missing");
  if (file_sha256(path) != it->second) throw Error(path + ": checksum mismatch (the file is corrupted)");
}

void verify_sums(const std::string& dir, const Sums& sums) {
  std::set<std::string> names = {"state.json", "adapter_config.json", "adapter_model.safetensors"};
  for (const char* f : CHECKPOINT_FILES)
    if (exists(join(dir, f))) names.insert(f);
  for (const auto& kv : sums) names.insert(kv.first);
  for (const auto& name : names) check_listed(dir, sums, name);
}

}  // namespace mobizo
