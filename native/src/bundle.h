// A training bundle (written by mobizo.bundle.write_bundle; the format is documented there):
//
//   train.pte, manifest.json     the exported program, as `mobizo export` writes them
//   run.json                     settings, shapes, the metrics.jsonl header, the adapter config
//   input_ids.bin, attention_mask.bin (N, R, T) int64; labels.bin (N, R, K) int64;
//   real_rows.bin (N,) int64; gold.bin (N,) int64 (choice objectives); batches.bin (S, B) int32;
//   schedule.bin (S, 2) float64 (optional: lr, eps per step)
//
// Every array is raw little-endian, row-major, checked against run.json (size and sha256).
// Format 2 adds run.json "text" and tokenizer.json (text.h): generation and --data on the device.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "json.h"

namespace mobizo {

struct ArrayFile {
  std::string path;
  std::vector<int64_t> shape;
  size_t itemsize = 0;
  int fd = -1;
  void read_at(size_t element_offset, void* out, size_t elements) const;
};

// Examples collated on the device from a JSONL (records.h): the bundle arrays' layout, in memory, taken
// in the batch order mobizo.data.step_indices gives for their number and the bundle's seed.
struct Examples {
  int64_t n = 0, seed = 0;
  std::vector<int64_t> ids, mask, labels, real_rows, gold;  // (n, R, T), (n, R, T), (n, R, K), (n,), (n,)
  std::string file, sha256;
};

struct Bundle {
  std::string dir;
  Json run, manifest;
  Json log_header;          // parsed form of run["log_header"] (its "config" goes into state.json)
  std::string log_header_line;
  int64_t examples = 0, rows_per_example = 0, length = 0, answer_len = 0, batch_size = 0, steps = 0;
  int64_t queries = 0, save_every = 0, max_bad_steps = 0;
  int64_t format = 1;
  bool choice = false;      // choice objectives take a `gold` input
  bool shared = false;      // one prompt row per example, labels = the candidates' token ids (manifest shared_prompt)
  int64_t choices = 0, program_answer_len = 0;  // the manifest's C and K (K: the answer window of one row)
  bool generate = false;    // the program has prefill / decode (manifest "generate")
  double lr = 0, eps = 0, max_grad = 0;
  std::vector<std::string> layers;                   // adapted modules, in the program's order
  std::vector<std::vector<int64_t>> adapter_shapes;  // B's shape per layer (out, r)
  // A stateful ZO update rule's state tensors (manifest "state": mobizo.zo_optim): what get_state returns
  // and set_state takes, in that order, with their initial value; empty for a stateless rule.
  struct StateSpec {
    std::string name;
    std::vector<int64_t> shape;
    float init = 0.f;
  };
  std::vector<StateSpec> state;
  std::vector<std::string> step_extras;  // train_step outputs after (losses, g), logged by name (HiZOO: curvature)
  // What to do when the smoothed loss diverges (run.json "divergence": mobizo.divergence's policy and
  // constants); "off" for a bundle written before it.
  struct Divergence {
    std::string policy = "off";
    double alpha = 0.1, factor = 2.0, margin = 0.5, lr_cut = 0.5;
    int64_t warmup = 10, patience = 20, max_rollbacks = 3;
  } divergence;
  ArrayFile input_ids, attention_mask, labels, batches, schedule;
  std::vector<int64_t> real_rows, gold;              // small: kept in memory
  bool has_schedule = false;

  static Bundle load(const std::string& dir);  // throws Error naming the first problem
  std::string pte_path() const;
  // lr, eps of 1-based `step`
  std::pair<double, double> lr_eps(int64_t step) const;
  // The rows of `step` exactly as mobizo.trainer.make_batch builds them (see gather in bundle.py): from
  // the bundle's arrays and batches.bin, or from `raw` examples in their step_indices order.
  void gather(int64_t step, std::vector<int64_t>& ids, std::vector<int64_t>& mask, std::vector<int64_t>& lab,
              std::vector<int64_t>& gold_out, const Examples* raw = nullptr) const;
};

}  // namespace mobizo
