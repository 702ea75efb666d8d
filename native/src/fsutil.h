// Files written the way mobizo.fsio writes them: a kill at any moment leaves either the
// old or the new version, never a torn one.
//
// * atomic_write_dir(target, fill): fill a hidden sibling ".<name>.tmp-XXXXXX", fsync it, then
//   rename target -> ".<name>.old", rename tmp -> target, delete ".<name>.old" (renamed into a
//   ".<name>.trash-XXXXXX" first so no reader sees it half-deleted). resolve_dir() returns
//   ".<name>.old" while target is missing (a kill between the two renames).
// * atomic_write_file(path, data): temp file, fsync, rename, fsync the directory.
// * clean_stale(dir): removes what a kill can leave: scratch entries and ".X.old" next to X.
//
// Every failure throws Error with one line naming the path and the OS reason (disk full, ...).
#pragma once

#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace mobizo {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_errno(const std::string& what, const std::string& path);

bool exists(const std::string& path);
bool is_dir(const std::string& path);
bool is_file(const std::string& path);
std::string read_file(const std::string& path);
void write_file_synced(const std::string& path, const std::string& data);  // create/truncate + fsync
void atomic_write_file(const std::string& path, const std::string& data);
void atomic_write_dir(const std::string& target, const std::function<void(const std::string& tmp)>& fill);
std::string resolve_dir(const std::string& target);  // target, its ".old" twin, or ""
void clean_stale(const std::string& dir);
void fsync_dir(const std::string& dir);
void make_dirs(const std::string& dir);
void remove_tree(const std::string& path);  // no error if missing
// Delete the entries of `dir` for which remove(name) holds (mobizo.fsio.clear_entries): they are
// renamed into a ".overwrite.trash-XXXXXX" dir, those with "checkpoint" in their name first (a kill
// midway never leaves a checkpoint without its log), then deleted.
void clear_entries(const std::string& dir, const std::function<bool(const std::string&)>& remove);
std::vector<std::string> list_dir(const std::string& dir);  // names, without . and ..
std::string parent_dir(const std::string& path);
std::string base_name(const std::string& path);
std::string real_path(const std::string& path);  // absolute, links resolved (realpath(3))
std::string join(const std::string& a, const std::string& b);
// Test hook, like MOBIZO_TEST_SLOW_CHECKPOINT in Python: sleep that many seconds at each stage
// of an atomic write so a fault-injection test can kill the process inside it.
void fault_pause();

}  // namespace mobizo
