// mobizo-train: the on-device zeroth-order trainer. Runs a bundle's train.pte (the whole P-RGE
// step exported by `mobizo export`) in the stock ExecuTorch runtime, with no Python and no torch:
//
//   mobizo-train BUNDLE --out RUN [--data FILE.jsonl] [--resume | --overwrite] [--steps N] [--quiet]
//   mobizo-train generate BUNDLE_OR_RUN --prompt TEXT ...     (generate.h)
//
// --data trains on new records tokenized on the device (records.h) instead of the bundle's arrays.
// It writes what `mobizo train` writes: RUN/metrics.jsonl (the bundle's header line, then one
// record per step), RUN/checkpoint/ (PEFT adapter + state.json + SHA256SUMS, every save_every steps and at
// the end), RUN/adapter/ (PEFT format), RUN/summary.json and the RUN/.mobizo marker, all atomically.
// --resume continues from the checkpoint bit for bit; a SIGKILL loses at most the steps since the
// last checkpoint. --overwrite needs the marker and removes only mobizo's entries (mobizo.rundir).
// Errors are one line on stderr ("mobizo-train: error: ...") and exit code 2.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "adapter.h"
#include "bundle.h"
#include "fsutil.h"
#include "generate.h"
#include "json.h"
#include "records.h"
#include "sha256.h"
#include "sums.h"
#include "text.h"

#ifndef MOBIZO_EXECUTORCH_VERSION
#define MOBIZO_EXECUTORCH_VERSION ""
#endif

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using EtError = executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Program;

namespace mobizo {
namespace {

const char* const PEFT_PREFIX = "base_model.model.";

struct Options {
  std::string bundle, out, data;
  bool resume = false, overwrite = false, quiet = false;
  int64_t steps = -1;
};

[[noreturn]] void usage_error(const std::string& msg) {
  throw mobizo::Error(msg + " (usage: mobizo-train BUNDLE --out RUN [--data FILE.jsonl] [--resume | --overwrite] "
                           "[--steps N] [--quiet]; mobizo-train generate BUNDLE_OR_RUN --prompt TEXT ...)");
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int k = 1; k < argc; ++k) {
    std::string a = argv[k];
    auto value = [&]() -> std::string {
      if (k + 1 >= argc) usage_error(a + " needs a value");
      return argv[++k];
    };
    if (a == "--out") o.out = value();
    else if (a == "--data") o.data = value();
    else if (a == "--resume") o.resume = true;
    else if (a == "--overwrite") o.overwrite = true;
    else if (a == "--quiet") o.quiet = true;
    else if (a == "--steps") {
      std::string v = value();
      char* end = nullptr;
      o.steps = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end) usage_error("--steps must be an integer >= 1, got '" + v + "'");
      // the rule of `mobizo train --steps` (mobizo.config): a run of 0 steps trains nothing
      if (o.steps < 1) usage_error("--steps must be >= 1, got " + std::to_string(o.steps));
    } else if (a == "--version") {
      std::string tk = tokenizer_library();
      std::printf("mobizo-train (executorch %s; tokenizer: %s)\n", MOBIZO_EXECUTORCH_VERSION,
                  tk.empty() ? "none" : tk.c_str());
      std::exit(0);
    } else if (a == "-h" || a == "--help") {
      std::printf("usage: mobizo-train BUNDLE --out RUN [--data FILE.jsonl] [--resume | --overwrite] [--steps N] [--quiet]\n"
                  "       mobizo-train generate BUNDLE_OR_RUN (--prompt TEXT)... [--input FILE|-] [--adapter DIR]\n"
                  "                    [--max-new-tokens N] [--stop STR]... [--temperature T] [--top-p P] [--seed S]\n"
                  "                    [--no-chat-template] [--json] [--threads 1]\n"
                  "       mobizo-train --version\n");
      std::exit(0);
    } else if (!a.empty() && a[0] == '-') usage_error("unknown option " + a);
    else if (o.bundle.empty()) o.bundle = a;
    else usage_error("unexpected argument " + a);
  }
  if (o.bundle.empty()) usage_error("missing BUNDLE");
  if (o.out.empty()) usage_error("missing --out RUN");
  if (o.resume && o.overwrite) usage_error("--resume and --overwrite exclude each other");
  return o;
}

// ------------------------------------------------------------------ the output directory

// The run directory follows mobizo.rundir: a ".mobizo" marker ({"mobizo": version, "kind": "run"})
// written at creation; --overwrite needs it and removes only mobizo's entries (a file of yours survives).
const char* const MARKER = ".mobizo";
const std::vector<std::string> ENTRIES = {"checkpoint", "adapter", "best", "summary.json", "metrics.jsonl", "program"};

// mobizo.rundir._SCRATCH, ^\.(.+)\.(tmp-|trash-|old$) with a greedy (.+): the entry a scratch name
// belongs to, and whether it is an ".X.old" twin. False if `n` is no such name.
bool split_scratch(const std::string& n, std::string& entry, bool& old) {
  if (n.size() < 2 || n[0] != '.') return false;
  for (size_t k = n.size() - 1; k >= 2; --k) {
    bool is_old = k + 4 == n.size() && n.compare(k, 4, ".old") == 0;
    if (is_old || n.compare(k, 5, ".tmp-") == 0 || n.compare(k, 7, ".trash-") == 0) {
      entry = n.substr(1, k - 1);
      old = is_old;
      return true;
    }
  }
  return false;
}

bool is_entry(const std::string& n) { return std::find(ENTRIES.begin(), ENTRIES.end(), n) != ENTRIES.end(); }

// An entry mobizo writes in a run directory, or the scratch of one of its atomic writes (rundir.is_mobizo_entry).
bool is_mobizo_entry(const std::string& n) {
  if (n == MARKER || is_entry(n)) return true;
  std::string entry;
  bool old = false;
  return split_scratch(n, entry, old) && (is_entry(entry) || entry == MARKER || entry == "overwrite");
}

// Scratch a kill can leave, not a complete entry: a directory holding only these counts as empty.
bool is_scratch_entry(const std::string& n) {
  std::string entry;
  bool old = false;
  return split_scratch(n, entry, old) && !old && is_mobizo_entry(n);
}

// rundir.read_marker: false if the marker is missing or not a JSON object with a "kind"; else its kind.
bool read_marker_kind(const std::string& out, std::string& kind) {
  try {
    Json m = parse_json(read_file(join(out, MARKER)));
    const Json* k = m.find("kind");
    if (!k) return false;
    kind = k->type == Json::Type::String ? k->s : std::string();
    return true;
  } catch (const JsonError&) {
    return false;
  } catch (const mobizo::Error&) {
    return false;
  }
}

bool has_run_marker(const std::string& out) {
  std::string kind;
  return read_marker_kind(out, kind) && kind == "run";
}

// At creation, and on --resume of a directory without one (RunDir.open). The version is the one
// of the mobizo that wrote the bundle.
void write_marker_if_missing(const std::string& out, const Bundle& b) {
  std::string kind;
  if (read_marker_kind(out, kind)) return;
  Json m = Json::object();
  const Json* ver = b.run.find("mobizo_version");
  m.set("mobizo", ver ? *ver : Json::null());
  m.set("kind", Json::string("run"));
  atomic_write_file(join(out, MARKER), dump_json(m, false, true) + "\n");
}

// Validate --out before anything is loaded or written (mobizo.rundir.RunDir.check).
void check_out(const Options& o) {
  if (exists(o.out) && !is_dir(o.out)) throw mobizo::Error("--out " + o.out + " exists and is not a directory");
  if (o.resume) {
    if (!is_dir(o.out) || resolve_dir(join(o.out, "checkpoint")).empty())
      throw mobizo::Error("--resume: no checkpoint in " + o.out +
                          " (a run killed before its first checkpoint has nothing to resume: start it again with "
                          "--overwrite)");
    if (access(o.out.c_str(), W_OK | X_OK) != 0) throw mobizo::Error("--out " + o.out + " is not writable");
    return;
  }
  if (is_dir(o.out)) {
    if (access(o.out.c_str(), W_OK | X_OK) != 0) throw mobizo::Error("--out " + o.out + " is not writable");
    auto names = list_dir(o.out);  // only the scratch of a run killed at its start: counts as empty
    if (std::any_of(names.begin(), names.end(), [](const std::string& n) { return !is_scratch_entry(n); })) {
      if (!o.overwrite)
        throw mobizo::Error("--out " + o.out +
                            " is not empty (use --resume to continue that run or --overwrite to replace it)");
      if (!has_run_marker(o.out))
        throw mobizo::Error("--overwrite: " + o.out + " is not a mobizo run directory (no " + MARKER +
                            " marker); not deleting anything");
    }
  } else {
    std::string parent = parent_dir(o.out);
    while (!exists(parent) && parent != parent_dir(parent)) parent = parent_dir(parent);
    if (!is_dir(parent)) throw mobizo::Error("cannot create --out " + o.out + ": " + parent + " is not a directory");
    if (access(parent.c_str(), W_OK | X_OK) != 0)
      throw mobizo::Error("cannot create --out " + o.out + ": " + parent + " is not writable");
  }
}

// ------------------------------------------------------------------ the program

// Hide the runtime's start-up chatter on fd 2 (like ExecuTorchEngine's quiet_stderr): our own
// errors are one line.
struct QuietStderr {
  int saved = -1;
  QuietStderr() {
    std::fflush(stderr);
    saved = dup(2);
    int devnull = open("/dev/null", O_WRONLY);
    if (saved >= 0 && devnull >= 0) dup2(devnull, 2);
    if (devnull >= 0) close(devnull);
  }
  ~QuietStderr() {
    if (saved >= 0) {
      dup2(saved, 2);
      close(saved);
    }
  }
};

std::string et_error(EtError e) { return executorch::runtime::to_string(e); }

struct TrainProgram {
  std::unique_ptr<Module> module;
  const Bundle* b = nullptr;
  std::vector<Tensor> a;  // frozen A per layer, read out once

  void load(const Bundle& bundle) {
    b = &bundle;
    const Json& m = bundle.manifest;
    std::string built = m.at("versions").at("executorch").as_string();
    std::string mine = MOBIZO_EXECUTORCH_VERSION;
    if (!mine.empty() && built != mine)
      throw mobizo::Error("program was built with executorch " + built + ", this mobizo-train with " + mine +
                          " (re-export it)");
    QuietStderr quiet;
    // mmap the program (no second copy of the weights); share the memory-planned arenas between
    // methods: the program was exported with share_mutable_buffers=True, so B lives in one
    // allocation that train_step, get_adapter and set_adapter all see.
    module = std::make_unique<Module>(bundle.pte_path(), Module::LoadMode::Mmap, nullptr, nullptr, nullptr,
                                      /*share_memory_arenas=*/true);
    EtError err = module->load(Program::Verification::InternalConsistency);
    if (err != EtError::Ok) throw mobizo::Error("ExecuTorch cannot load " + bundle.pte_path() + " (" + et_error(err) + ")");
    auto names = module->method_names();
    if (!names.ok()) throw mobizo::Error("ExecuTorch cannot read the methods of " + bundle.pte_path());
    for (const char* want : {"train_step", "get_adapter", "set_adapter"}) {
      if (!names->count(want)) throw mobizo::Error(bundle.pte_path() + " lacks the method " + want);
      err = module->load_method(want);  // not `score`: its XNNPACK delegate would pack another weight copy
      if (err != EtError::Ok) throw mobizo::Error(std::string("ExecuTorch cannot load method ") + want + " (" + et_error(err) + ")");
    }
    check_signatures();
  }

  // The manifest and the program must agree (a swapped train.pte with a matching sha256 in a
  // hand-edited manifest, or a manifest for another shape).
  void check_signatures() {
    const Bundle& bd = *b;
    auto mismatch = [&](const std::string& what) {
      return mobizo::Error("manifest.json does not match train.pte: " + what + " (re-export the program)");
    };
    auto shape_of = [](const executorch::runtime::TensorInfo& t) {
      std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
      return s;
    };
    auto ts = module->method_meta("train_step");
    if (!ts.ok()) throw mismatch("no train_step metadata");
    size_t want_inputs = bd.choice ? 7 : 6;
    if (ts->num_inputs() != want_inputs) throw mismatch("train_step takes " + std::to_string(ts->num_inputs()) + " inputs");
    const int64_t rows = bd.batch_size * bd.rows_per_example;
    std::vector<std::vector<int64_t>> want = {{rows, bd.length}, {rows, bd.length}, {rows, bd.answer_len}, {}, {}, {}};
    std::vector<ScalarType> types = {ScalarType::Long, ScalarType::Long, ScalarType::Long, ScalarType::Long,
                                     ScalarType::Float, ScalarType::Float};
    if (bd.choice) {
      want.push_back({bd.batch_size});
      types.push_back(ScalarType::Long);
    }
    for (size_t k = 0; k < want_inputs; ++k) {
      auto t = ts->input_tensor_meta(k);
      if (!t.ok() || shape_of(*t) != want[k] || t->scalar_type() != types[k])
        throw mismatch("train_step input " + std::to_string(k) + " has another shape or dtype");
    }
    if (ts->num_outputs() != 2 + bd.step_extras.size())
      throw mismatch("train_step returns " + std::to_string(ts->num_outputs()) + " outputs");
    if (!bd.state.empty()) {
      for (const char* want : {"get_state", "set_state"}) {
        auto names = module->method_names();
        if (!names.ok() || !names->count(want)) throw mismatch(std::string("no ") + want + " method for the rule's state");
        EtError err = module->load_method(want);
        if (err != EtError::Ok) throw mobizo::Error(std::string("ExecuTorch cannot load method ") + want + " (" + et_error(err) + ")");
      }
      auto ss = module->method_meta("set_state");
      if (!ss.ok() || ss->num_inputs() != bd.state.size()) throw mismatch("set_state takes another number of tensors");
      for (size_t k = 0; k < bd.state.size(); ++k) {
        auto t = ss->input_tensor_meta(k);
        if (!t.ok() || shape_of(*t) != bd.state[k].shape || t->scalar_type() != ScalarType::Float)
          throw mismatch("optimizer state " + bd.state[k].name + " has another shape");
      }
    }
    auto sa = module->method_meta("set_adapter");
    if (!sa.ok() || sa->num_inputs() != bd.layers.size()) throw mismatch("set_adapter takes another number of tensors");
    for (size_t k = 0; k < bd.layers.size(); ++k) {
      auto t = sa->input_tensor_meta(k);
      if (!t.ok() || shape_of(*t) != bd.adapter_shapes[k] || t->scalar_type() != ScalarType::Float)
        throw mismatch("adapter tensor of " + bd.layers[k] + " has another shape");
    }
    auto ga = module->method_meta("get_adapter");
    if (!ga.ok() || ga->num_outputs() != 2 * bd.layers.size()) throw mismatch("get_adapter returns another number of tensors");
  }

  std::vector<EValue> run(const char* method, const std::vector<EValue>& inputs) {
    auto res = module->execute(method, inputs);
    if (!res.ok()) throw mobizo::Error(std::string("ExecuTorch ") + method + " failed (" + et_error(res.error()) + ")");
    return std::move(*res);
  }

  static Tensor copy_out(const EValue& v) {
    const auto& t = v.toTensor();
    Tensor out;
    for (auto d : t.sizes()) out.shape.push_back(d);
    const float* p = t.const_data_ptr<float>();
    out.data.assign(p, p + t.numel());
    return out;
  }

  // (A_0, B_0, A_1, B_1, ...) copied out at once: outputs may alias the shared arenas.
  std::vector<Tensor> get_adapter() {
    auto outs = run("get_adapter", {});
    std::vector<Tensor> ts;
    for (const auto& v : outs) ts.push_back(copy_out(v));
    return ts;
  }

  // The update rule's state tensors, in the manifest's order (get_state / set_state).
  std::vector<Tensor> get_state() {
    std::vector<Tensor> ts;
    for (const auto& v : run("get_state", {})) ts.push_back(copy_out(v));
    return ts;
  }

  void set_state(std::vector<Tensor>& ts) {
    std::vector<TensorPtr> keep;
    std::vector<EValue> inputs;
    for (auto& t : ts) {
      std::vector<executorch::aten::SizesType> sizes(t.shape.begin(), t.shape.end());
      keep.push_back(from_blob(t.data.data(), sizes, ScalarType::Float));
      inputs.emplace_back(*keep.back());
    }
    run("set_state", inputs);
  }

  void set_adapter(std::vector<Tensor>& bs) {
    std::vector<TensorPtr> keep;
    std::vector<EValue> inputs;
    for (size_t k = 0; k < bs.size(); ++k) {
      std::vector<executorch::aten::SizesType> sizes(bs[k].shape.begin(), bs[k].shape.end());
      keep.push_back(from_blob(bs[k].data.data(), sizes, ScalarType::Float));
      inputs.emplace_back(*keep.back());
    }
    run("set_adapter", inputs);
  }
};

// ------------------------------------------------------------------ the loss torch would log

// float(losses.mean()) as PyTorch computes it for the (2, q) float32 losses on an AVX2 build (what
// ExecuTorchEngine logs): sum in float32 with ATen's cascade_sum layout (4 partial sums for fewer
// than 8 values; 8-lane vectors, then their lanes, from 8 values on), then divide by n.
float torch_mean(const std::vector<float>& x) {
  const size_t n = x.size(), lanes = 8;
  if (n == 0) return NAN;
  float sum = 0.f;
  if (n < lanes) {
    float p[4] = {0.f, 0.f, 0.f, 0.f};
    size_t full = n / 4;
    for (size_t i = 0; i < full; ++i)
      for (size_t k = 0; k < 4; ++k) p[k] += x[4 * i + k];
    for (size_t i = full * 4; i < n; ++i) p[0] += x[i];
    sum = ((p[0] + p[1]) + p[2]) + p[3];
  } else {
    size_t vecs = n / lanes, full = vecs / 4;
    float acc[4][8] = {};
    for (size_t i = 0; i < full; ++i)
      for (size_t k = 0; k < 4; ++k)
        for (size_t l = 0; l < lanes; ++l) acc[k][l] += x[(4 * i + k) * lanes + l];
    for (size_t v = full * 4; v < vecs; ++v)
      for (size_t l = 0; l < lanes; ++l) acc[0][l] += x[v * lanes + l];
    for (size_t k = 1; k < 4; ++k)
      for (size_t l = 0; l < lanes; ++l) acc[0][l] += acc[k][l];
    for (size_t i = vecs * lanes; i < n; ++i) sum += x[i];
    for (size_t l = 0; l < lanes; ++l) sum += acc[0][l];
  }
  return sum / float(n);
}

// ------------------------------------------------------------------ checkpoints

// mobizo.divergence.Monitor: a moving average of the applied steps' losses and the streak of steps it has
// stayed above max(factor x its lowest, lowest + margin), with the bundle's constants.
struct Monitor {
  double average = NAN, lowest = NAN;
  int64_t steps = 0, streak = 0;

  double threshold(const Bundle::Divergence& d) const { return std::max(d.factor * lowest, lowest + d.margin); }

  bool update(double loss, const Bundle::Divergence& d) {
    if (!std::isfinite(loss)) return false;
    ++steps;
    average = std::isnan(average) ? loss : (1 - d.alpha) * average + d.alpha * loss;
    if (steps <= d.warmup) {
      lowest = std::isnan(lowest) ? average : std::min(lowest, average);
      return false;
    }
    if (average > threshold(d)) {
      ++streak;
    } else {
      streak = 0;
      lowest = std::min(lowest, average);
    }
    return streak >= d.patience;
  }

  Json to_json() const {  // Monitor.state(): the field order of the Python dataclass
    Json m = Json::object();
    m.set("average", std::isfinite(average) ? Json::number(average) : Json::null());
    m.set("lowest", std::isfinite(lowest) ? Json::number(lowest) : Json::null());
    m.set("steps", Json::integer(steps));
    m.set("streak", Json::integer(streak));
    return m;
  }

  static Monitor of(const Json* j) {
    Monitor m;
    if (!j || j->type != Json::Type::Object) return m;
    auto num = [&](const char* k) {
      const Json* v = j->find(k);
      return v && !v->is_null() ? v->as_double(k) : NAN;
    };
    m.average = num("average");
    m.lowest = num("lowest");
    if (const Json* v = j->find("steps")) m.steps = v->as_int("steps");
    if (const Json* v = j->find("streak")) m.streak = v->as_int("streak");
    return m;
  }
};

struct RunState {
  int64_t step = 0, skipped = 0;
  double last_loss = NAN;
  Monitor monitor;
  double lr_scale = 1.0;  // what divergence rollbacks left of the bundle's lr
  Json rollbacks = Json::array();
  Json rollback;  // the rollback point kept in this checkpoint (null: the checkpoint is it)
};

// Where the run's bundle is and what it trained on (generate finds the program by it; --resume checks the data)
Json bundle_record(const Bundle& b) {
  Json r = Json::object();
  r.set("path", Json::string(real_path(b.dir)));
  r.set("pte_sha256", b.manifest.at("pte_sha256"));
  return r;
}

Json data_record(const Examples* raw) {
  if (!raw) return Json::null();  // the bundle's own arrays
  Json r = Json::object();
  r.set("file", Json::string(real_path(raw->file)));
  r.set("sha256", Json::string(raw->sha256));
  r.set("examples", Json::integer(raw->n));
  return r;
}

const int64_t CHECKPOINT_FORMAT = 2;  // mobizo.checkpoint.CHECKPOINT_FORMAT

Json state_json(const Bundle& b, const RunState& s, int64_t total_steps, const Examples* raw) {
  Json st = Json::object();
  st.set("step", Json::integer(s.step));
  st.set("config", b.log_header.at("config"));
  const Json* ver = b.run.find("mobizo_version");
  st.set("mobizo_version", ver ? *ver : Json::null());
  st.set("skipped_steps", Json::integer(s.skipped));
  st.set("last_loss", std::isfinite(s.last_loss) ? Json::number(s.last_loss) : Json::null());
  Json settings = Json::object();
  settings.set("steps", Json::integer(total_steps));
  settings.set("save_every", Json::integer(b.save_every));
  settings.set("max_bad_steps", Json::integer(b.max_bad_steps));
  st.set("settings", settings);
  st.set("engine", Json::string("native"));
  st.set("pte_sha256", b.manifest.at("pte_sha256"));
  st.set("bundle", bundle_record(b));
  if (raw) st.set("data", data_record(raw));
  if (!b.state.empty()) st.set("zo_state", Json::boolean(true));  // zo_state.safetensors beside it
  st.set("monitor", s.monitor.to_json());
  st.set("lr_scale", Json::number(s.lr_scale));
  st.set("rollbacks", s.rollbacks);
  if (!s.rollback.is_null()) st.set("rollback", s.rollback);
  st.set("checkpoint_format", Json::integer(CHECKPOINT_FORMAT));  // its files' checksums: SHA256SUMS (sums.h)
  return st;
}

TensorMap peft_tensors(const Bundle& b, const std::vector<Tensor>& ab) {
  TensorMap t;
  for (size_t k = 0; k < b.layers.size(); ++k) {
    t[PEFT_PREFIX + b.layers[k] + ".lora_A.weight"] = ab[2 * k];
    t[PEFT_PREFIX + b.layers[k] + ".lora_B.weight"] = ab[2 * k + 1];
  }
  return t;
}

void write_adapter(const Bundle& b, const std::string& dir, const TensorMap& tensors) {
  const Json& ad = b.run.at("adapter");
  write_file_synced(join(dir, "adapter_config.json"), ad.at("config").as_string());
  write_file_synced(join(dir, "adapter_model.safetensors"), safetensors_bytes(tensors, ad.at("metadata")));
}

// ------------------------------------------------------------------ metrics.jsonl

// The header and the records up to `upto` (mobizo.rundir.read_log): later steps will be
// redone, and a line cut by a kill is dropped.
std::string kept_metrics(const std::string& path, int64_t upto, const std::string& header) {
  std::string text = is_file(path) ? read_file(path) : "";
  std::string out;
  bool have_header = false, any = false;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    std::string line = text.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
    pos = nl == std::string::npos ? text.size() : nl + 1;
    Json rec;
    try {
      rec = parse_json(line);
    } catch (const JsonError&) {
      continue;
    }
    if (rec.type != Json::Type::Object) continue;
    const Json* step = rec.find("step");
    if (rec.find("mobizo_log") && !any) {
      have_header = true;
    } else if (!(step && step->type == Json::Type::Int && step->i <= upto)) {
      continue;
    }
    out += line + "\n";
    any = true;
  }
  return have_header ? out : header + "\n" + out;
}

void append_line(int fd, const std::string& path, const std::string& line) {
  // one write per record: a kill leaves at most a partial last line, which readers drop; a write that
  // fails (a full disk after part of the line went out) is cut back to the last whole line
  struct stat st;
  const off_t before = fstat(fd, &st) == 0 ? st.st_size : -1;
  size_t off = 0;
  while (off < line.size()) {
    ssize_t n = write(fd, line.data() + off, line.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      if (before >= 0) (void)!ftruncate(fd, before);  // best effort: readers drop a torn last line anyway
      errno = err;
      throw_errno("cannot write", path);
    }
    off += size_t(n);
  }
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// ------------------------------------------------------------------ the run

int train(const Options& o) {
  check_out(o);
  Bundle b = Bundle::load(o.bundle);
  const int64_t total = o.steps >= 0 ? o.steps : b.steps;
  if (total > b.steps)
    throw mobizo::Error("--steps " + std::to_string(total) + ": the bundle holds batches for " +
                        std::to_string(b.steps) + " steps (write a bundle with more steps)");
  // --data: every record read, tokenized and collated before the program loads (errors are quick)
  std::unique_ptr<Examples> raw;
  if (!o.data.empty()) {
    TextSpec spec = TextSpec::of(b.dir, b.run);
    TextTokenizer tok(spec);
    raw = std::make_unique<Examples>(read_examples(b, spec, Encoder(tok), o.data));
  }
  TrainProgram prog;
  prog.load(b);

  // B: zeros for a fresh run, the checkpoint's for --resume (shared mutable buffers start
  // uninitialised in the runtime, so B is always set explicitly).
  std::vector<Tensor> bs;
  for (const auto& s : b.adapter_shapes) {
    Tensor t;
    t.shape = s;
    t.data.assign(size_t(s[0] * s[1]), 0.f);
    bs.push_back(t);
  }
  prog.set_adapter(bs);
  std::vector<Tensor> opt_state;  // the rule's initial state (mobizo.zo_optim), or the checkpoint's below
  for (const auto& spec : b.state) {
    Tensor t;
    t.shape = spec.shape;
    size_t n = 1;
    for (auto d : spec.shape) n *= size_t(d);
    t.data.assign(n, spec.init);
    opt_state.push_back(t);
  }
  if (!opt_state.empty()) prog.set_state(opt_state);
  std::vector<Tensor> ab = prog.get_adapter();
  if (ab.size() != 2 * b.layers.size()) throw mobizo::Error("get_adapter returned an unexpected number of tensors");

  RunState st;
  const std::string ckpt = join(o.out, "checkpoint"), metrics_path = join(o.out, "metrics.jsonl");
  clean_stale(o.out);  // what a killed atomic write left, in every mode (RunDir.open)
  if (o.resume) {
    std::string d = resolve_dir(ckpt);
    const std::string hint = " (start again with --overwrite)";
    Json state;
    Sums sums;
    bool has_sums = false;
    try {
      has_sums = read_sums(d, &sums);  // format 2: state.json's bytes are checked before it is parsed
      if (has_sums) check_listed(d, sums, "state.json");
      state = parse_json(read_file(join(d, "state.json")));
      int64_t format = 1;
      if (const Json* f = state.find("checkpoint_format")) format = f->as_int("checkpoint_format");
      if (format < 1)
        throw mobizo::Error(join(d, "state.json") + ": invalid checkpoint_format " + std::to_string(format) +
                            " in the checkpoint state");
      if (format > CHECKPOINT_FORMAT)
        throw mobizo::Error(join(d, "state.json") + ": checkpoint format " + std::to_string(format) +
                            " is newer than this mobizo-train reads (" + std::to_string(CHECKPOINT_FORMAT) +
                            "): upgrade it");
      if (!has_sums && format > 1) throw mobizo::Error(join(d, SUMS) + ": missing");
      if (!has_sums) {
        // Legacy (checkpoint format 1, before SHA256SUMS): state.json held the sha256 of its canonical JSON,
        // mobizo.checkpoint._state_sha256 = sha256(json.dumps(state without "sha256", sort_keys=True)); checking
        // it is what still needs dump_json to write exactly what Python's json.dumps writes.
        Json body = state;
        body.o.erase(std::remove_if(body.o.begin(), body.o.end(), [](auto& kv) { return kv.first == "sha256"; }),
                     body.o.end());
        const Json* sum = state.find("sha256");
        if (!sum || sum->type != Json::Type::String || sum->s != sha256_hex(dump_json(body, true)))
          throw mobizo::Error(join(d, "state.json") + ": checksum mismatch (the file is corrupted)");
      }
      st.step = state.at("step").as_int("step");
      st.skipped = state.at("skipped_steps").as_int("skipped_steps");
      st.last_loss = state.at("last_loss").is_null() ? NAN : state.at("last_loss").as_double("last_loss");
      st.monitor = Monitor::of(state.find("monitor"));
      if (const Json* v = state.find("lr_scale")) st.lr_scale = v->as_double("lr_scale");
      if (const Json* v = state.find("rollbacks"); v && v->type == Json::Type::Array) st.rollbacks = *v;
      if (const Json* v = state.find("rollback"); v && v->type == Json::Type::Object) st.rollback = *v;
    } catch (const JsonError& e) {
      throw mobizo::Error("cannot resume: " + join(d, "state.json") + ": unreadable checkpoint state (" + e.what() + ")" + hint);
    } catch (const mobizo::Error& e) {
      throw mobizo::Error(std::string("cannot resume: ") + e.what() + hint);
    }
    if (!json_equal(state.at("config"), b.log_header.at("config")) || !state.find("pte_sha256") ||
        !json_equal(state.at("pte_sha256"), b.manifest.at("pte_sha256")))
      throw mobizo::Error("--resume: the checkpoint in " + o.out + " belongs to another bundle or run configuration");
    const Json* trained = state.find("data");
    bool had_data = trained && trained->type == Json::Type::Object;
    if (had_data != bool(raw) || (raw && trained->at("sha256").as_string() != raw->sha256))
      throw mobizo::Error("--resume: the run in " + o.out + " trained on " +
                          (had_data ? "--data " + trained->at("file").as_string() + " (sha256 " +
                                          trained->at("sha256").as_string().substr(0, 12) + "...)"
                                    : "the bundle's own examples") +
                          (raw ? ", not on this --data file" : ": give the same --data"));
    if (st.step > total)
      throw mobizo::Error("--resume: the checkpoint in " + o.out + " is at step " + std::to_string(st.step) +
                          ", past --steps " + std::to_string(total));
    TensorMap saved;
    try {
      saved = read_safetensors_checked(join(d, "adapter_model.safetensors"));
      if (!is_file(join(d, "adapter_config.json"))) throw mobizo::Error(join(d, "adapter_config.json") + ": missing");
    } catch (const mobizo::Error& e) {
      throw mobizo::Error(std::string("cannot resume: ") + e.what() + hint);
    }
    TensorMap current = peft_tensors(b, ab);
    if (saved.size() != current.size()) throw mobizo::Error("cannot resume: the checkpoint adapter has other layers" + hint);
    for (const auto& kv : current) {
      auto it = saved.find(kv.first);
      if (it == saved.end() || it->second.shape != kv.second.shape)
        throw mobizo::Error("cannot resume: the checkpoint adapter does not fit this program (" + kv.first + ")" + hint);
      if (kv.first.find(".lora_A.") != std::string::npos && it->second.data != kv.second.data)
        throw mobizo::Error("cannot resume: " + kv.first + " differs from the program's frozen A" + hint);
    }
    for (size_t k = 0; k < b.layers.size(); ++k) bs[k] = saved[PEFT_PREFIX + b.layers[k] + ".lora_B.weight"];
    prog.set_adapter(bs);
    if (!opt_state.empty()) {  // the rule's state: checksummed like an adapter, every tensor named, shaped, finite
      TensorMap st_saved;
      try {
        st_saved = read_safetensors_checked(join(d, "zo_state.safetensors"));
      } catch (const mobizo::Error& e) {
        throw mobizo::Error(std::string("cannot resume: ") + e.what() + hint);
      }
      for (size_t k = 0; k < b.state.size(); ++k) {
        auto it = st_saved.find(b.state[k].name);
        if (it == st_saved.end() || it->second.shape != b.state[k].shape)
          throw mobizo::Error("cannot resume: the checkpoint's optimizer state does not fit this program (" +
                              b.state[k].name + ")" + hint);
        for (float v : it->second.data)
          if (!std::isfinite(v))
            throw mobizo::Error("cannot resume: optimizer state " + b.state[k].name +
                                " has non-finite values (the checkpoint is corrupted)" + hint);
        opt_state[k] = it->second;
      }
      if (st_saved.size() != b.state.size())
        throw mobizo::Error("cannot resume: the checkpoint's optimizer state has other tensors" + hint);
      prog.set_state(opt_state);
    }
    try {
      if (has_sums) verify_sums(d, sums);  // every file's bytes (the rollback point's too, read below)
    } catch (const mobizo::Error& e) {
      throw mobizo::Error(std::string("cannot resume: ") + e.what() + hint);
    }
    write_marker_if_missing(o.out, b);
    atomic_write_file(metrics_path, kept_metrics(metrics_path, st.step, b.log_header_line));
  } else {
    if (o.overwrite && is_dir(o.out))  // only mobizo's entries, the marker kept; the checkpoint goes first
      clear_entries(o.out, [](const std::string& n) { return n != MARKER && is_mobizo_entry(n); });
    make_dirs(o.out);
    write_marker_if_missing(o.out, b);
    atomic_write_file(metrics_path, b.log_header_line + "\n");
  }

  // The last healthy checkpoint, in memory: what a divergence rollback restores.
  const Bundle::Divergence& div = b.divergence;
  struct Snapshot {
    bool valid = false;
    int64_t step = 0, skipped = 0;
    double last_loss = NAN;
    Monitor monitor;
    std::vector<Tensor> ab, opt;  // (A_0, B_0, A_1, B_1, ...) and the rule's state
  } snap;
  bool warned = false;
  auto take_snapshot = [&](int64_t at) {
    snap.ab = prog.get_adapter();
    snap.opt = b.state.empty() ? std::vector<Tensor>() : prog.get_state();
    snap.step = at;
    snap.skipped = st.skipped;
    snap.last_loss = st.last_loss;
    snap.monitor = st.monitor;
    snap.valid = true;
  };
  int mfd = open(metrics_path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  if (mfd < 0) throw_errno("cannot open", metrics_path);
  int64_t last_ckpt = st.step;
  auto save_ckpt = [&](int64_t step) {
    if (fsync(mfd) != 0) throw_errno("cannot write", metrics_path);  // the log always covers the checkpoint
    RunState s = st;
    s.step = step;
    TensorMap tensors = peft_tensors(b, prog.get_adapter());
    TensorMap rule_state;
    if (!b.state.empty()) {
      std::vector<Tensor> now = prog.get_state();
      for (size_t k = 0; k < b.state.size(); ++k) rule_state[b.state[k].name] = now[k];
    }
    // a checkpoint that is not itself the rollback point keeps that point (mobizo.trainer does the same), so a
    // resumed run rolls back where the uninterrupted one would
    TensorMap rollback;
    if (snap.valid && snap.step != step) {
      for (size_t k = 0; k < b.layers.size(); ++k) {
        rollback["adapter." + b.layers[k] + ".lora_A"] = snap.ab[2 * k];
        rollback["adapter." + b.layers[k] + ".lora_B"] = snap.ab[2 * k + 1];
      }
      for (size_t k = 0; k < b.state.size(); ++k) rollback["optimizer." + b.state[k].name] = snap.opt[k];
      Json r = Json::object();
      r.set("step", Json::integer(snap.step));
      r.set("monitor", snap.monitor.to_json());
      r.set("skipped", Json::integer(snap.skipped));
      r.set("last_loss", std::isfinite(snap.last_loss) ? Json::number(snap.last_loss) : Json::null());
      s.rollback = r;
    }
    atomic_write_dir(ckpt, [&](const std::string& tmp) {
      write_adapter(b, tmp, tensors);
      if (!rollback.empty()) {
        Json meta = Json::object();
        meta.set("format", Json::string("pt"));
        write_file_synced(join(tmp, "rollback.safetensors"), safetensors_bytes(rollback, meta));
      }
      if (!rule_state.empty()) {
        Json meta = Json::object();
        meta.set("format", Json::string("pt"));
        write_file_synced(join(tmp, "zo_state.safetensors"), safetensors_bytes(rule_state, meta));
      }
      write_file_synced(join(tmp, "state.json"), dump_json(state_json(b, s, total, raw.get()), true) + "\n");
      write_sums(tmp);  // last, over the bytes as written (the directory swap makes the whole atomic)
    });
    last_ckpt = step;
  };
  if (!o.resume) save_ckpt(0);  // a run killed at any point after this can be resumed

  if (!st.rollback.is_null()) {  // a resumed checkpoint that keeps an earlier rollback point
    TensorMap r;
    try {
      r = read_safetensors_checked(join(resolve_dir(ckpt), "rollback.safetensors"));
    } catch (const mobizo::Error& e) {
      throw mobizo::Error(std::string("cannot resume: ") + e.what() + " (start again with --overwrite)");
    }
    auto take = [&](const std::string& key) {
      auto it = r.find(key);
      if (it == r.end()) throw mobizo::Error("cannot resume: rollback.safetensors lacks " + key);
      return it->second;
    };
    snap.ab.clear();
    for (const auto& l : b.layers) {
      snap.ab.push_back(take("adapter." + l + ".lora_A"));
      snap.ab.push_back(take("adapter." + l + ".lora_B"));
    }
    snap.opt.clear();
    for (const auto& spec : b.state) snap.opt.push_back(take("optimizer." + spec.name));
    snap.step = st.rollback.at("step").as_int("rollback.step");
    snap.monitor = Monitor::of(st.rollback.find("monitor"));
    snap.skipped = st.rollback.at("skipped").as_int("rollback.skipped");
    snap.last_loss = st.rollback.at("last_loss").is_null() ? NAN : st.rollback.at("last_loss").as_double();
    snap.valid = true;
    st.rollback = Json();
  }
  if (!snap.valid && st.monitor.streak == 0) take_snapshot(st.step);

  if (!o.quiet)
    std::printf("mobizo-train: %s -> %s, steps %lld..%lld of %lld\n", o.bundle.c_str(), o.out.c_str(),
                (long long)st.step + 1, (long long)total, (long long)total);
  std::vector<int64_t> ids, mask, lab, gold;
  const int64_t rows = b.batch_size * b.rows_per_example;
  const float max_grad = float(b.max_grad);
  int64_t bad_run = 0, timed = 0;
  double total_time = 0;
  auto t_report = std::chrono::steady_clock::now();
  int64_t report_step = st.step;
  int64_t step = st.step;
  for (step = st.step + 1; step <= total; ++step) {
    b.gather(step, ids, mask, lab, gold, raw.get());
    auto [bundle_lr, eps] = b.lr_eps(step);
    const double lr = bundle_lr * st.lr_scale;  // logged as applied: replay follows a rollback
    auto t0 = std::chrono::steady_clock::now();
    int64_t step_v = step;
    float lr_v = float(lr), eps_v = float(eps);
    std::vector<TensorPtr> keep = {
        from_blob(ids.data(), {int(rows), int(b.length)}, ScalarType::Long),
        from_blob(mask.data(), {int(rows), int(b.length)}, ScalarType::Long),
        from_blob(lab.data(), {int(rows), int(b.answer_len)}, ScalarType::Long),
        from_blob(&step_v, {}, ScalarType::Long),
        from_blob(&lr_v, {}, ScalarType::Float),
        from_blob(&eps_v, {}, ScalarType::Float)};
    if (b.choice) keep.push_back(from_blob(gold.data(), {int(b.batch_size)}, ScalarType::Long));
    std::vector<EValue> inputs;
    for (auto& t : keep) inputs.emplace_back(*t);
    auto outs = prog.run("train_step", inputs);
    Tensor losses = TrainProgram::copy_out(outs[0]), grads = TrainProgram::copy_out(outs[1]);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    total_time += dt;
    ++timed;
    if (int64_t(grads.data.size()) != b.queries) throw mobizo::Error("train_step returned an unexpected number of gradients");

    // the host's verdict of the in-graph guard (mobizo.step.step_is_good, float32 comparisons)
    bool good = true;
    for (float v : losses.data) good = good && std::isfinite(v);
    for (float g : grads.data) good = good && std::isfinite(g) && std::fabs(g) <= max_grad;
    double loss = double(torch_mean(losses.data));
    Json rec = Json::object();
    rec.set("step", Json::integer(step));
    rec.set("loss", Json::number(loss));
    Json g = Json::array();
    for (float v : grads.data) g.push(Json::number(double(v)));
    rec.set("projected_grads", g);
    rec.set("lr", Json::number(lr));
    rec.set("eps", Json::number(eps));
    rec.set("seconds", Json::number(dt));
    // after the fields every step has, as mobizo.trainer logs them
    for (size_t k = 0; k < b.step_extras.size(); ++k) {  // e.g. HiZOO's curvature, which replay needs
      Tensor x = TrainProgram::copy_out(outs[2 + k]);
      Json arr = Json::array();
      for (float v : x.data) arr.push(Json::number(double(v)));
      rec.set(b.step_extras[k], arr);
    }
    bool diverged = false;
    if (good) {
      bad_run = 0;
      st.last_loss = loss;
      diverged = div.policy != "off" && st.monitor.update(loss, div);
    } else {  // the step left B untouched (in-graph guard); count it
      ++bad_run;
      ++st.skipped;
      rec.set("skipped", Json::boolean(true));
    }
    append_line(mfd, metrics_path, dump_json(rec, false, /*strict=*/true) + "\n");

    auto now = std::chrono::steady_clock::now();
    double since = std::chrono::duration<double>(now - t_report).count();
    if (!o.quiet && (since >= 1.0 || step == total)) {
      std::printf("step %lld/%lld  loss %s  %s steps/s\n", (long long)step, (long long)total,
                  std::isfinite(st.last_loss) ? fmt("%.4f", st.last_loss).c_str() : "nan",
                  fmt("%.1f", double(step - report_step) / std::max(since, 1e-9)).c_str());
      std::fflush(stdout);
      t_report = now;
      report_step = step;
    }
    if (bad_run >= b.max_bad_steps) {
      std::string msg = "training stopped at step " + std::to_string(step) + ": " + std::to_string(bad_run) +
                        " consecutive bad steps (non-finite loss or |g| > max_grad); last good checkpoint: step " +
                        std::to_string(last_ckpt) + " in " + ckpt + " (write a bundle with a lower lr or eps and --resume)";
      Json s = Json::object();
      s.set("status", Json::string("stopped"));
      s.set("final_step", Json::integer(step));
      s.set("error", Json::string(msg));
      s.set("last_checkpoint_step", Json::integer(last_ckpt));
      s.set("skipped_steps", Json::integer(st.skipped));
      s.set("engine", Json::string("native"));
      close(mfd);
      atomic_write_file(join(o.out, "summary.json"), dump_json(s, false, true) + "\n");
      throw mobizo::Error(msg);
    }
    if (diverged) {
      std::string what = "the training loss diverged by step " + std::to_string(step) + ": its moving average " +
                         fmt("%.4g", st.monitor.average) + " stayed above " + fmt("%.4g", st.monitor.threshold(div)) +
                         " (" + fmt("%g", div.factor) + "x its lowest, " + fmt("%.4g", st.monitor.lowest) + ") for " +
                         std::to_string(div.patience) + " steps";
      if (div.policy == "warn") {
        if (!warned) std::fprintf(stderr, "mobizo-train: warning: %s\n", what.c_str());
        warned = true;
      } else if (div.policy == "stop" || !snap.valid || int64_t(st.rollbacks.a.size()) >= div.max_rollbacks) {
        std::string tried =
            st.rollbacks.a.empty() ? "" : " after " + std::to_string(st.rollbacks.a.size()) + " rollbacks";
        std::string msg = "training stopped at step " + std::to_string(step) + tried + ": " + what +
                          "; last good checkpoint: step " + std::to_string(last_ckpt) + " in " + ckpt +
                          " (write a bundle with a lower lr and start again)";
        Json s = Json::object();
        s.set("status", Json::string("diverged"));
        s.set("final_step", Json::integer(step));
        s.set("error", Json::string(msg));
        s.set("last_checkpoint_step", Json::integer(last_ckpt));
        s.set("skipped_steps", Json::integer(st.skipped));
        s.set("rollbacks", st.rollbacks);
        s.set("engine", Json::string("native"));
        close(mfd);
        atomic_write_file(join(o.out, "summary.json"), dump_json(s, false, true) + "\n");
        throw mobizo::Error(msg);
      } else {  // roll back to the last healthy checkpoint's adapter and state, with a lower lr
        std::vector<Tensor> bs_back;
        for (size_t k = 0; k < b.layers.size(); ++k) bs_back.push_back(snap.ab[2 * k + 1]);
        prog.set_adapter(bs_back);
        if (!snap.opt.empty()) prog.set_state(snap.opt);
        st.monitor = snap.monitor;
        st.skipped = snap.skipped;
        st.last_loss = snap.last_loss;
        st.lr_scale *= div.lr_cut;
        Json r = Json::object();
        r.set("at_step", Json::integer(step));
        r.set("to_step", Json::integer(snap.step));
        r.set("lr_scale", Json::number(st.lr_scale));
        st.rollbacks.push(r);
        bad_run = 0;
        close(mfd);  // the undone steps are redone: the log keeps what the checkpoint covers
        atomic_write_file(metrics_path, kept_metrics(metrics_path, snap.step, b.log_header_line));
        mfd = open(metrics_path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
        if (mfd < 0) throw_errno("cannot open", metrics_path);
        std::fprintf(stderr, "mobizo-train: warning: %s; rolled back to step %lld with the learning rate x%g (rollback %zu of at most %lld)\n",
                     what.c_str(), (long long)snap.step, st.lr_scale, st.rollbacks.a.size(),
                     (long long)div.max_rollbacks);
        save_ckpt(snap.step);  // a kill from here resumes the rolled-back run
        step = snap.step;
        continue;
      }
    }
    // checkpoints never land inside a streak of bad steps (resuming redoes them) nor while the loss is
    // above the divergence threshold: the last one is healthy
    if (b.save_every && step % b.save_every == 0 && step != total && bad_run == 0 &&
        (div.policy == "off" || st.monitor.streak == 0)) {
      take_snapshot(step);
      save_ckpt(step);
    }
  }
  step = std::max(st.step, total);
  save_ckpt(step);
  close(mfd);
  TensorMap final_adapter = peft_tensors(b, prog.get_adapter());
  atomic_write_dir(join(o.out, "adapter"), [&](const std::string& tmp) { write_adapter(b, tmp, final_adapter); });
  Json s = Json::object();
  s.set("status", Json::string("completed"));
  s.set("final_step", Json::integer(step));
  s.set("final_loss", std::isfinite(st.last_loss) ? Json::number(st.last_loss) : Json::null());
  s.set("skipped_steps", Json::integer(st.skipped));
  s.set("rollbacks", st.rollbacks);
  s.set("seconds_per_step", timed ? Json::number(total_time / double(timed)) : Json::null());
  s.set("engine", Json::string("native"));
  s.set("bundle", bundle_record(b));
  if (raw) s.set("data", data_record(raw.get()));
  s.set("estimator", b.manifest.at("estimator"));
  s.set("config", b.log_header.at("config"));
  s.set("mobizo_version", b.run.find("mobizo_version") ? *b.run.find("mobizo_version") : Json::null());
  atomic_write_file(join(o.out, "summary.json"), dump_json(s, false, true) + "\n");
  return 0;
}

}  // namespace
}  // namespace mobizo

int main(int argc, char** argv) {
  std::signal(SIGXFSZ, SIG_IGN);  // a file-size limit is a write error, reported like a full disk
  try {
    // a subcommand, unless --out says this is training a bundle that happens to be called so
    std::string cmd = argc > 1 ? argv[1] : "";
    bool training = std::any_of(argv + 1, argv + argc, [](const char* a) { return std::string(a) == "--out"; });
    if (cmd == "generate" && !training) return mobizo::generate_main(argc, argv);
    if (cmd == "tokenize" && !training) return mobizo::tokenize_main(argc, argv);
    return mobizo::train(mobizo::parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::string msg = e.what();
    for (char& c : msg)
      if (c == '\n') c = ' ';
    std::fprintf(stderr, "mobizo-train: error: %s\n", msg.c_str());
    return 2;
  }
}
