#include "bundle.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "fsutil.h"
#include "pyrandom.h"
#include "sha256.h"

namespace mobizo {

static constexpr int64_t IGNORE = -100;

void ArrayFile::read_at(size_t element_offset, void* out, size_t elements) const {
  size_t want = elements * itemsize, done = 0;
  off_t off = off_t(element_offset * itemsize);
  char* p = static_cast<char*>(out);
  while (done < want) {
    ssize_t n = pread(fd, p + done, want - done, off + off_t(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("cannot read", path);
    if (n == 0) throw Error(path + " is truncated (the bundle changed while training?)");
    done += size_t(n);
  }
}

static std::string file_sha256(const std::string& path, int fd, size_t* size) {
  Sha256 h;
  std::vector<char> buf(1 << 20);
  size_t total = 0;
  while (true) {
    ssize_t n = pread(fd, buf.data(), buf.size(), off_t(total));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("cannot read", path);
    if (n == 0) break;
    h.update(buf.data(), size_t(n));
    total += size_t(n);
  }
  *size = total;
  return h.hexdigest();
}

static Json read_json_file(const std::string& path) {
  std::string text = read_file(path);
  try {
    return parse_json(text);
  } catch (const JsonError& e) {
    throw Error(path + ": malformed JSON (" + e.what() + ")");
  }
}

static ArrayFile open_array(const Bundle& b, const std::string& name, const char* dtype, size_t itemsize,
                            const std::vector<int64_t>& shape) {
  const Json* spec = b.run.at("arrays").find(name);
  if (!spec) throw Error("run.json lists no array '" + name + "'");
  ArrayFile a;
  a.path = join(b.dir, spec->at("file").as_string(name + ".file"));
  a.itemsize = itemsize;
  if (spec->at("dtype").as_string(name + ".dtype") != dtype)
    throw Error("run.json: array " + name + " must be " + dtype);
  for (const auto& d : spec->at("shape").a) a.shape.push_back(d.as_int(name + ".shape"));
  if (a.shape != shape) throw Error("run.json: array " + name + " has a shape that does not match the program");
  if (!is_file(a.path)) throw Error("bundle " + b.dir + " is missing " + base_name(a.path));
  a.fd = open(a.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (a.fd < 0) throw_errno("cannot read", a.path);
  size_t numel = 1;
  for (int64_t d : shape) numel *= size_t(d);
  size_t size = 0;
  std::string digest = file_sha256(a.path, a.fd, &size);
  if (size != numel * itemsize || digest != spec->at("sha256").as_string(name + ".sha256"))
    throw Error(a.path + " is truncated or corrupted (its sha256 does not match run.json)");
  return a;
}

std::string Bundle::pte_path() const { return join(dir, "train.pte"); }

Bundle Bundle::load(const std::string& dir) {
  Bundle b;
  b.dir = dir;
  if (!is_dir(dir)) throw Error("bundle " + dir + " does not exist or is not a directory");
  for (const char* f : {"run.json", "manifest.json", "train.pte"})
    if (!is_file(join(dir, f))) throw Error("bundle " + dir + " is missing " + f);
  b.run = read_json_file(join(dir, "run.json"));
  b.manifest = read_json_file(join(dir, "manifest.json"));
  try {
    const Json& r = b.run;
    const Json& m = b.manifest;
    const Json* fmt = r.type == Json::Type::Object ? r.find("mobizo_bundle") : nullptr;
    if (!fmt || fmt->type != Json::Type::Int || (fmt->i != 1 && fmt->i != 2))
      throw Error(join(dir, "run.json") + " is not a mobizo bundle (format 1 or 2)");
    b.format = fmt->i;
    // the program must be the one the manifest describes, and the one run.json was written for
    size_t size = 0;
    std::string pte = b.pte_path();
    int fd = open(pte.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_errno("cannot read", pte);
    std::string digest = file_sha256(pte, fd, &size);
    close(fd);
    if (int64_t(size) != m.at("pte_bytes").as_int("pte_bytes") || digest != m.at("pte_sha256").as_string())
      throw Error(pte + " is truncated or corrupted (its sha256 does not match manifest.json)");
    if (r.at("pte_sha256").as_string("pte_sha256") != digest)
      throw Error("run.json was written for another program than this train.pte (rebuild the bundle)");

    b.examples = r.at("examples").as_int("examples");
    b.rows_per_example = r.at("rows_per_example").as_int("rows_per_example");
    b.length = r.at("length").as_int("length");
    b.answer_len = r.at("answer_len").as_int("answer_len");
    b.batch_size = r.at("batch_size").as_int("batch_size");
    b.steps = r.at("steps").as_int("steps");
    b.save_every = r.at("save_every").as_int("save_every");
    b.max_bad_steps = r.at("max_bad_steps").as_int("max_bad_steps");
    if (const Json* d = r.find("divergence")) {
      auto& v = b.divergence;
      v.policy = d->at("policy").as_string("divergence.policy");
      v.alpha = d->at("alpha").as_double("divergence.alpha");
      v.factor = d->at("factor").as_double("divergence.factor");
      v.margin = d->at("margin").as_double("divergence.margin");
      v.lr_cut = d->at("lr_cut").as_double("divergence.lr_cut");
      v.warmup = d->at("warmup").as_int("divergence.warmup");
      v.patience = d->at("patience").as_int("divergence.patience");
      v.max_rollbacks = d->at("max_rollbacks").as_int("divergence.max_rollbacks");
      if (v.policy != "rollback" && v.policy != "stop" && v.policy != "warn" && v.policy != "off")
        throw Error("run.json: unknown divergence policy " + v.policy);
    }
    b.lr = r.at("lr").as_double("lr");
    b.eps = r.at("eps").as_double("eps");
    std::string objective = r.at("objective").as_string("objective");
    b.choice = objective != "answer";
    b.queries = m.at("queries").as_int("queries");
    b.max_grad = m.at("max_grad").is_null() ? INFINITY : m.at("max_grad").as_double("max_grad");
    if (b.examples < 1 || b.steps < 0 || b.batch_size < 1 || b.save_every < 0 || b.max_bad_steps < 1)
      throw Error("run.json: invalid sizes or settings");
    // run.json and the manifest must describe the same shapes
    // A shared-prompt program (one-token candidates) takes one prompt row per example and a labels
    // input of the candidates' token ids: R = 1, K = choices (mobizo.engines.executorch.manifest).
    int64_t choices = m.at("choices").as_int("choices");
    bool shared = m.find("shared_prompt") && m.at("shared_prompt").type == Json::Type::Bool &&
                  m.at("shared_prompt").as_bool();
    b.shared = shared;
    b.choices = choices;
    b.program_answer_len = m.at("answer_len").as_int("answer_len");
    b.generate = m.find("generate") && m.at("generate").type == Json::Type::Bool && m.at("generate").as_bool();
    int64_t want_rows = (b.choice && !shared) ? choices : 1;
    int64_t want_k = shared ? choices : m.at("answer_len").as_int();
    if (objective != m.at("objective").as_string() || b.length != m.at("max_length").as_int() ||
        b.answer_len != want_k || b.batch_size != m.at("batch_size").as_int() ||
        b.rows_per_example != want_rows)
      throw Error("run.json does not match manifest.json (objective, T, K or batch size differ; rebuild the bundle)");
    for (const auto& kv : m.at("adapter_shapes").o) {
      b.layers.push_back(kv.first);
      std::vector<int64_t> shape;
      for (const auto& d : kv.second.a) shape.push_back(d.as_int("adapter shape"));
      if (shape.size() != 2) throw Error("manifest.json: adapter shape of " + kv.first + " is not a matrix");
      b.adapter_shapes.push_back(shape);
    }
    if (b.layers.empty()) throw Error("manifest.json lists no adapted layers");
    if (const Json* st = m.find("state")) {  // absent in programs of a mobizo without update rules
      for (const auto& e : st->a) {
        Bundle::StateSpec spec;
        spec.name = e.at("name").as_string("state name");
        for (const auto& d : e.at("shape").a) spec.shape.push_back(d.as_int("state shape"));
        spec.init = float(e.at("init").as_double("state init"));
        b.state.push_back(spec);
      }
    }
    if (const Json* ex = m.find("step_extras"))
      for (const auto& e : ex->a) b.step_extras.push_back(e.as_string("step_extras"));
    b.log_header_line = r.at("log_header").as_string("log_header");
    try {
      b.log_header = parse_json(b.log_header_line);
    } catch (const JsonError& e) {
      throw Error(std::string("run.json: log_header is not JSON (") + e.what() + ")");
    }
    if (b.log_header_line.find('\n') != std::string::npos || !b.log_header.find("config"))
      throw Error("run.json: log_header is not a one-line metrics header");
    r.at("adapter").at("config").as_string("adapter.config");
    r.at("adapter").at("metadata");

    const int64_t N = b.examples, R = b.rows_per_example, T = b.length, K = b.answer_len;
    b.input_ids = open_array(b, "input_ids", "int64", 8, {N, R, T});
    b.attention_mask = open_array(b, "attention_mask", "int64", 8, {N, R, T});
    b.labels = open_array(b, "labels", "int64", 8, {N, R, K});
    b.batches = open_array(b, "batches", "int32", 4, {b.steps, b.batch_size});
    ArrayFile rr = open_array(b, "real_rows", "int64", 8, {N});
    b.real_rows.resize(size_t(N));
    rr.read_at(0, b.real_rows.data(), size_t(N));
    close(rr.fd);
    for (int64_t v : b.real_rows)
      if (v < 1 || v > R) throw Error("real_rows.bin holds an invalid row count (corrupted bundle)");
    if (b.choice) {
      ArrayFile g = open_array(b, "gold", "int64", 8, {N});
      b.gold.resize(size_t(N));
      g.read_at(0, b.gold.data(), size_t(N));
      close(g.fd);
    }
    if (r.at("arrays").find("schedule")) {
      b.schedule = open_array(b, "schedule", "float64", 8, {b.steps, 2});
      b.has_schedule = true;
    }
  } catch (const JsonError& e) {
    throw Error(std::string("bundle ") + dir + ": run.json or manifest.json: " + e.what());
  }
  return b;
}

std::pair<double, double> Bundle::lr_eps(int64_t step) const {
  if (!has_schedule) return {lr, eps};
  double v[2];
  schedule.read_at(size_t(step - 1) * 2, v, 2);
  return {v[0], v[1]};
}

void Bundle::gather(int64_t step, std::vector<int64_t>& ids, std::vector<int64_t>& mask, std::vector<int64_t>& lab,
                    std::vector<int64_t>& gold_out, const Examples* raw) const {
  const size_t B = size_t(batch_size), R = size_t(rows_per_example), T = size_t(length), K = size_t(answer_len);
  std::vector<int64_t> idx(B);
  if (raw) {
    idx = step_indices(raw->n, batch_size, step, raw->seed);
  } else {
    std::vector<int32_t> stored(B);
    batches.read_at(size_t(step - 1) * B, stored.data(), B);
    std::copy(stored.begin(), stored.end(), idx.begin());
  }
  const int64_t n_examples = raw ? raw->n : examples;
  ids.assign(B * R * T, 0);
  mask.assign(B * R * T, 0);
  lab.assign(B * R * K, IGNORE);
  gold_out.assign(B, IGNORE);
  for (size_t b = 0; b < B; ++b) {
    if (idx[b] < 0 || idx[b] >= n_examples) throw Error("batches.bin holds an invalid example index (corrupted bundle)");
    size_t e = size_t(idx[b]);
    if (raw) {
      std::copy_n(&raw->ids[e * R * T], R * T, &ids[b * R * T]);
      std::copy_n(&raw->mask[e * R * T], R * T, &mask[b * R * T]);
      std::copy_n(&raw->labels[e * R * K], R * K, &lab[b * R * K]);
      if (choice) gold_out[b] = raw->gold[e];
      continue;
    }
    input_ids.read_at(e * R * T, &ids[b * R * T], R * T);
    attention_mask.read_at(e * R * T, &mask[b * R * T], R * T);
    labels.read_at(e * R * K, &lab[b * R * K], R * K);
    if (choice) gold_out[b] = gold[e];
  }
  // Filler rows (an example with fewer candidates than R): mobizo.data.collate fills them with the
  // next real sequence of the batch (wrapping to the first) and supervises nothing.
  for (size_t b = 0; b < B; ++b) {
    size_t real = size_t(raw ? raw->real_rows[size_t(idx[b])] : real_rows[size_t(idx[b])]);
    size_t next = (b + 1) % B;
    for (size_t r = real; r < R; ++r) {
      size_t row = b * R + r, src = next * R;
      std::memcpy(&ids[row * T], &ids[src * T], T * sizeof(int64_t));
      std::memcpy(&mask[row * T], &mask[src * T], T * sizeof(int64_t));
      std::fill(&lab[row * K], &lab[row * K] + K, IGNORE);
    }
  }
}

}  // namespace mobizo
