#include "fsutil.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

namespace mobizo {

void throw_errno(const std::string& what, const std::string& path) {
  throw Error(what + " " + path + ": " + std::strerror(errno));
}

bool exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

bool is_dir(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string join(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  return a.back() == '/' ? a + b : a + "/" + b;
}

std::string parent_dir(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  size_t k = p.rfind('/');
  if (k == std::string::npos) return ".";
  return k == 0 ? "/" : p.substr(0, k);
}

std::string real_path(const std::string& path) {
  char* r = ::realpath(path.c_str(), nullptr);
  if (!r) throw_errno("cannot resolve", path);
  std::string out(r);
  std::free(r);
  return out;
}

std::string base_name(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  size_t k = p.rfind('/');
  return k == std::string::npos ? p : p.substr(k + 1);
}

std::string read_file(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_errno("cannot read", path);
  std::string out;
  char buf[1 << 16];
  while (true) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      close(fd);
      errno = e;
      throw_errno("cannot read", path);
    }
    if (n == 0) break;
    out.append(buf, size_t(n));
  }
  close(fd);
  return out;
}

static void write_all(int fd, const std::string& data, const std::string& path) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot write", path);
    }
    off += size_t(n);
  }
}

void write_file_synced(const std::string& path, const std::string& data) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw_errno("cannot create", path);
  try {
    write_all(fd, data, path);
    if (fsync(fd) != 0) throw_errno("cannot write", path);
  } catch (...) {
    close(fd);
    throw;
  }
  if (close(fd) != 0) throw_errno("cannot write", path);
}

void fsync_dir(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  fsync(fd);
  close(fd);
}

void fault_pause() {
  const char* s = std::getenv("MOBIZO_TEST_SLOW_CHECKPOINT");
  if (s && *s) std::this_thread::sleep_for(std::chrono::duration<double>(std::atof(s)));
}

static std::string make_temp_dir(const std::string& parent, const std::string& prefix) {
  std::string tmpl = join(parent, prefix + "XXXXXX");
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw_errno("cannot create a directory in", parent);
  // mkdtemp makes 0700: use the usual permissions (what Python's atomic_write_dir does too)
  mode_t mask = umask(0);
  umask(mask);
  chmod(buf.data(), 0777 & ~mask);
  return std::string(buf.data());
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = opendir(dir.c_str());
  if (!d) throw_errno("cannot list", dir);
  while (struct dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

void remove_tree(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const auto& n : list_dir(path)) remove_tree(join(path, n));
    rmdir(path.c_str());
  } else {
    unlink(path.c_str());
  }
}

static void fsync_tree(const std::string& dir) {
  for (const auto& n : list_dir(dir)) {
    std::string p = join(dir, n);
    if (is_dir(p)) {
      fsync_tree(p);
      continue;
    }
    int fd = open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_errno("cannot open", p);
    if (fsync(fd) != 0) {
      int e = errno;
      close(fd);
      errno = e;
      throw_errno("cannot write", p);
    }
    close(fd);
  }
  fsync_dir(dir);
}

static void discard(const std::string& path) {
  std::string name = base_name(path);
  while (!name.empty() && name[0] == '.') name.erase(0, 1);
  std::string trash = make_temp_dir(parent_dir(path), "." + name + ".trash-");
  if (rename(path.c_str(), join(trash, "x").c_str()) != 0) throw_errno("cannot move", path);
  remove_tree(trash);
}

void make_dirs(const std::string& dir) {
  if (dir.empty() || is_dir(dir)) return;
  make_dirs(parent_dir(dir));
  if (mkdir(dir.c_str(), 0777) != 0 && errno != EEXIST) throw_errno("cannot create", dir);
}

void atomic_write_dir(const std::string& target, const std::function<void(const std::string&)>& fill) {
  std::string parent = parent_dir(target), name = base_name(target);
  make_dirs(parent);
  std::string tmp = make_temp_dir(parent, "." + name + ".tmp-");
  try {
    fill(tmp);
    fault_pause();
    fsync_tree(tmp);
    std::string old = join(parent, "." + name + ".old");
    if (exists(target)) {
      if (exists(old)) discard(old);  // stale: a kill after the last swap's second rename
      if (rename(target.c_str(), old.c_str()) != 0) throw_errno("cannot move", target);
      fsync_dir(parent);
      fault_pause();  // target missing, .old complete: resolve_dir finds .old
    }
    if (rename(tmp.c_str(), target.c_str()) != 0) throw_errno("cannot move", tmp);
    fsync_dir(parent);
    if (exists(old)) {
      fault_pause();
      discard(old);
    }
  } catch (...) {
    remove_tree(tmp);
    throw;
  }
}

void atomic_write_file(const std::string& path, const std::string& data) {
  std::string parent = parent_dir(path);
  std::string tmpl = join(parent, "." + base_name(path) + ".tmp-XXXXXX");
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  int fd = mkstemp(buf.data());
  if (fd < 0) throw_errno("cannot create a file in", parent);
  std::string tmp(buf.data());
  mode_t mask = umask(0);
  umask(mask);
  fchmod(fd, 0666 & ~mask);
  try {
    write_all(fd, data, path);
    if (fsync(fd) != 0) throw_errno("cannot write", path);
    if (close(fd) != 0) {
      fd = -1;
      throw_errno("cannot write", path);
    }
    fd = -1;
    fault_pause();
    if (rename(tmp.c_str(), path.c_str()) != 0) throw_errno("cannot move", tmp);
    fsync_dir(parent);
  } catch (...) {
    if (fd >= 0) close(fd);
    unlink(tmp.c_str());
    throw;
  }
}

std::string resolve_dir(const std::string& target) {
  if (is_dir(target)) return target;
  std::string old = join(parent_dir(target), "." + base_name(target) + ".old");
  return is_dir(old) ? old : "";
}

static bool is_scratch(const std::string& n) {
  // ^\..+\.(tmp|trash)-
  if (n.size() < 2 || n[0] != '.') return false;
  for (const char* tag : {".tmp-", ".trash-"}) {
    size_t k = n.find(tag, 2);
    if (k != std::string::npos) return true;
  }
  return false;
}

void clean_stale(const std::string& dir) {
  if (!is_dir(dir)) return;
  for (const auto& n : list_dir(dir)) {
    std::string p = join(dir, n);
    bool stale_old = n.size() > 5 && n[0] == '.' && n.compare(n.size() - 4, 4, ".old") == 0 &&
                     exists(join(dir, n.substr(1, n.size() - 5)));
    if (stale_old && is_dir(p)) discard(p);
    else if (is_scratch(n)) remove_tree(p);
  }
}

void clear_entries(const std::string& dir, const std::function<bool(const std::string&)>& remove) {
  std::vector<std::string> names;
  for (const auto& n : list_dir(dir))
    if (remove(n)) names.push_back(n);
  if (names.empty()) return;
  // mobizo.fsio.clear_entries: key ("checkpoint" not in name, name)
  auto key = [](const std::string& n) { return std::make_pair(n.find("checkpoint") == std::string::npos, n); };
  std::sort(names.begin(), names.end(), [&](const std::string& x, const std::string& y) { return key(x) < key(y); });
  std::string trash = make_temp_dir(dir, ".overwrite.trash-");
  for (const auto& n : names)
    if (rename(join(dir, n).c_str(), join(trash, n).c_str()) != 0) throw_errno("cannot move", join(dir, n));
  remove_tree(trash);
}

}  // namespace mobizo
