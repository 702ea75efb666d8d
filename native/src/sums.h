// SHA256SUMS: a checkpoint's sha256 of each of its files' bytes (mobizo.checkpoint, checkpoint format 2),
// in the format `sha256sum` prints and `sha256sum -c` checks: "<64 hex>  <name>\n", sorted by name.
// A checksum over bytes needs no canonical form of the content: before it (format 1) state.json held a
// sha256 of its own canonical JSON, which this trainer had to write exactly as Python's json.dumps.
#pragma once

#include <map>
#include <string>

namespace mobizo {

extern const char* const SUMS;  // "SHA256SUMS"
using Sums = std::map<std::string, std::string>;  // file name -> hex sha256

std::string file_sha256(const std::string& path);  // read in chunks

// Write dir/SHA256SUMS over every other file of dir (a checkpoint being written: call it last).
void write_sums(const std::string& dir);
// dir/SHA256SUMS into *out; false when there is none (format 1). A damaged one throws Error naming it.
bool read_sums(const std::string& dir, Sums* out);
// `name` is listed, present, and its bytes match (else one line naming the file).
void check_listed(const std::string& dir, const Sums& sums, const std::string& name);
// check_listed for every listed file and for every file of a checkpoint that a loader reads
// (state.json and the adapter always, the optimizer and rollback state when present).
void verify_sums(const std::string& dir, const Sums& sums);

}  // namespace mobizo
