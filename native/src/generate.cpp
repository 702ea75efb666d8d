#include "generate.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "adapter.h"
#include "bundle.h"
#include "fsutil.h"
#include "json.h"
#include "text.h"

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using EtError = executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Program;

namespace mobizo {
namespace {

const char* const USAGE =
    "usage: mobizo-train generate BUNDLE_OR_RUN (--prompt TEXT)... [--input FILE|-] [--adapter DIR] "
    "[--max-new-tokens N] [--stop STR]... [--temperature T] [--top-p P] [--seed S] [--no-chat-template] [--json] "
    "[--threads 1]";
const char* const FFFD = "\xEF\xBF\xBD";  // U+FFFD: an unfinished UTF-8 sequence, as decoding shows it

[[noreturn]] void usage_error(const std::string& msg) { throw Error(msg + " (" + USAGE + ")"); }

// Hide the runtime's start-up chatter on fd 2: our own errors are one line
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

struct Sampling {
  int64_t max_new_tokens = 128;
  double temperature = 0.0, top_p = 1.0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
};

struct GenOptions {
  std::string source, adapter, input;
  std::vector<std::string> prompts;
  Sampling sampling;
  bool chat = true, json = false, single_thread = false;
};

double parse_number(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  double d = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) usage_error(flag + " must be a number, got '" + v + "'");
  return d;
}

int64_t parse_integer(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno) usage_error(flag + " must be an integer, got '" + v + "'");
  return x;
}

GenOptions parse_generate(int argc, char** argv) {
  GenOptions o;
  for (int k = 2; k < argc; ++k) {
    std::string a = argv[k];
    auto value = [&]() -> std::string {
      if (k + 1 >= argc) usage_error(a + " needs a value");
      return argv[++k];
    };
    if (a == "--prompt") o.prompts.push_back(value());
    else if (a == "--input") o.input = value();
    else if (a == "--adapter") o.adapter = value();
    else if (a == "--max-new-tokens") o.sampling.max_new_tokens = parse_integer(a, value());
    else if (a == "--stop") o.sampling.stop.push_back(value());
    else if (a == "--temperature") o.sampling.temperature = parse_number(a, value());
    else if (a == "--top-p") o.sampling.top_p = parse_number(a, value());
    else if (a == "--seed") o.sampling.seed = uint64_t(parse_integer(a, value()));
    else if (a == "--no-chat-template") o.chat = false;
    else if (a == "--json") o.json = true;
    else if (a == "--threads") {
      std::string v = value();
      if (v != "1")
        usage_error("--threads: only 1 can be chosen (without it the runtime's pool runs one thread per core), got '" +
                    v + "'");
      o.single_thread = true;
    } else if (a == "-h" || a == "--help") {
      std::printf("%s\n", USAGE);
      std::exit(0);
    } else if (!a.empty() && a[0] == '-') usage_error("unknown option " + a);
    else if (o.source.empty()) o.source = a;
    else usage_error("unexpected argument " + a);
  }
  if (o.source.empty()) usage_error("missing BUNDLE_OR_RUN");
  // mobizo.generation.SamplingConfig.check
  const Sampling& s = o.sampling;
  if (s.max_new_tokens < 1)
    throw Error("--max-new-tokens must be an integer >= 1, got " + std::to_string(s.max_new_tokens));
  if (!(s.temperature >= 0) || std::isinf(s.temperature))
    throw Error("--temperature must be a finite number >= 0, got " + py_float_repr(s.temperature));
  if (!(s.top_p > 0 && s.top_p <= 1)) throw Error("--top-p must be in (0, 1], got " + py_float_repr(s.top_p));
  for (const auto& st : s.stop)
    if (st.empty()) throw Error("--stop strings must not be empty");
  for (const auto& p : o.prompts)
    if (p.empty()) throw Error("--prompt must not be empty");
  return o;
}

// ------------------------------------------------------------------ inputs (mobizo.inference.read_inputs)

std::vector<std::string> read_prompts(const std::string& path) {
  std::string name = path == "-" ? "<stdin>" : path;
  std::string text;
  if (path == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    if (!exists(path)) throw Error("--input " + path + " does not exist");
    if (is_dir(path)) throw Error("--input " + path + " is a directory, not a file");
    text = read_file(path);
  }
  if (!valid_utf8(text)) {
    std::string ok = utf8_lossy(text);
    size_t k = 0;
    while (k < text.size() && text[k] == ok[k]) ++k;
    throw Error("--input " + name + ": not valid UTF-8 text (byte offset " + std::to_string(k) + ")");
  }
  std::vector<std::pair<int64_t, std::string>> lines;
  size_t pos = 0;
  for (int64_t n = 1; pos <= text.size(); ++n) {
    size_t nl = text.find('\n', pos);
    std::string line = text.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
    pos = nl == std::string::npos ? text.size() + 1 : nl + 1;
    while (!line.empty() && line.back() == '\r') line.pop_back();
    if (!strip_space(line).empty()) lines.emplace_back(n, line);
  }
  if (lines.empty()) throw Error("--input " + name + ": no inputs (the file is empty)");
  std::string lower = name;
  for (char& c : lower) c = char(std::tolower(static_cast<unsigned char>(c)));
  auto ends = [&](const char* suf) {
    size_t n = std::strlen(suf);
    return lower.size() >= n && lower.compare(lower.size() - n, n, suf) == 0;
  };
  bool jsonl = ends(".jsonl") || ends(".json");
  if (!jsonl && !ends(".txt")) {
    try {
      jsonl = parse_json(lines[0].second).type == Json::Type::Object;
    } catch (const JsonError&) {
      jsonl = false;
    }
  }
  std::vector<std::string> out;
  for (const auto& [n, line] : lines) {
    if (!jsonl) {
      out.push_back(line);
      continue;
    }
    Json rec;
    try {
      rec = parse_json(line);
    } catch (const JsonError& e) {
      throw Error(name + ":" + std::to_string(n) + ": malformed JSON line: " + e.what());
    }
    if (rec.type != Json::Type::Object) throw Error(name + ":" + std::to_string(n) + ": expected a JSON object");
    const Json* p = rec.find("prompt");
    if (!p || p->type != Json::Type::String || p->s.empty())
      throw Error(name + ":" + std::to_string(n) + ": no \"prompt\" field (a non-empty string)");
    out.push_back(p->s);
  }
  return out;
}

// ------------------------------------------------------------------ what to load

struct Source {
  std::string bundle, adapter;  // adapter: "" = the base model (B = 0)
  std::string pte_sha256;       // what the run trained on ("" for a bare bundle)
};

Source resolve_source(const GenOptions& o) {
  Source s;
  const std::string& p = o.source;
  if (is_file(join(p, "run.json"))) {
    s.bundle = p;
  } else if (is_dir(p) && !resolve_dir(join(p, "checkpoint")).empty()) {
    std::string ck = resolve_dir(join(p, "checkpoint"));
    Json state;
    try {
      state = parse_json(read_file(join(ck, "state.json")));
    } catch (const JsonError& e) {
      throw Error(join(ck, "state.json") + ": malformed JSON (" + e.what() + ")");
    }
    const Json* b = state.find("bundle");
    if (!b || b->type != Json::Type::Object)
      throw Error(p + " does not record its bundle (not trained by this mobizo-train): give the bundle and "
                      "--adapter " + join(p, "adapter"));
    s.bundle = b->at("path").as_string("bundle.path");
    s.pte_sha256 = b->at("pte_sha256").as_string("bundle.pte_sha256");
    if (!is_file(join(s.bundle, "run.json")))
      throw Error("the bundle " + p + " was trained on, " + s.bundle + ", is missing (moved?): give it, as in "
                  "mobizo-train generate BUNDLE --adapter " + join(p, "adapter"));
    std::string final_adapter = resolve_dir(join(p, "adapter"));
    s.adapter = final_adapter.empty() ? ck : final_adapter;  // a run stopped before its end: its checkpoint
  } else if (is_dir(p)) {
    throw Error(p + " is neither a bundle (no run.json) nor a mobizo-train run directory (no checkpoint)");
  } else {
    throw Error(p + " does not exist or is not a directory");
  }
  if (!o.adapter.empty()) {
    std::string d = resolve_dir(o.adapter);
    if (d.empty() || !is_file(join(d, "adapter_model.safetensors")))
      throw Error("--adapter " + o.adapter + " is not an adapter directory (no adapter_model.safetensors)");
    s.adapter = d;
  }
  return s;
}

// ------------------------------------------------------------------ the program's generation methods

struct Generator {
  std::unique_ptr<Module> module;
  const Bundle* b = nullptr;
  int64_t chunk = 0, vocab = 0;

  std::vector<std::string> ran;
  std::vector<EValue> run(const char* method, const std::vector<EValue>& inputs) {
    // the runtime's thread pool starts on a method's first call, and its cpuinfo probe prints to stderr
    std::optional<QuietStderr> quiet;
    if (std::find(ran.begin(), ran.end(), method) == ran.end()) {
      quiet.emplace();
      ran.push_back(method);
    }
    auto res = module->execute(method, inputs);
    if (!res.ok()) throw Error(std::string("ExecuTorch ") + method + " failed (" + et_error(res.error()) + ")");
    return std::move(*res);
  }

  void load(const Bundle& bundle) {
    b = &bundle;
    QuietStderr quiet;
    // prefill and decode have their own XNNPACK delegates: with the backend's weights cache (off by
    // default in the runtime; mobizo.patches.share_packed_weights turns it on in Python) they share
    // one packed copy of the weights, keyed by the constants' names
    executorch::runtime::BackendOptions<1> opts;
    if (opts.set_option("weight_cache_enabled", true) == EtError::Ok)
      (void)executorch::runtime::set_option("XnnpackBackend", opts.view());
    module = std::make_unique<Module>(bundle.pte_path(), Module::LoadMode::Mmap, nullptr, nullptr, nullptr,
                                      /*share_memory_arenas=*/true);
    EtError err = module->load(Program::Verification::InternalConsistency);
    if (err != EtError::Ok) throw Error("ExecuTorch cannot load " + bundle.pte_path() + " (" + et_error(err) + ")");
    auto names = module->method_names();
    if (!names.ok()) throw Error("ExecuTorch cannot read the methods of " + bundle.pte_path());
    for (const char* want : {"prefill", "decode", "get_adapter", "set_adapter"}) {
      if (!names->count(want)) throw Error(bundle.pte_path() + " lacks the method " + want + " (re-export it)");
      err = module->load_method(want);
      if (err != EtError::Ok) throw Error(std::string("ExecuTorch cannot load method ") + want + " (" + et_error(err) + ")");
    }
    auto pm = module->method_meta("prefill");
    auto dm = module->method_meta("decode");
    auto bad = [&](const std::string& what) {
      return Error("manifest.json does not match train.pte: " + what + " (re-export the program)");
    };
    if (!pm.ok() || !dm.ok() || pm->num_inputs() != 3 || dm->num_inputs() != 3) throw bad("prefill/decode take 3 inputs");
    auto t0 = pm->input_tensor_meta(0), d0 = dm->input_tensor_meta(0);
    if (!t0.ok() || t0->sizes().size() != 2 || t0->sizes()[0] != 1 || t0->scalar_type() != ScalarType::Long ||
        !d0.ok() || d0->sizes().size() != 2 || d0->sizes()[1] != 1)
      throw bad("prefill/decode token inputs");
    chunk = t0->sizes()[1];
    const Json* want_chunk = bundle.manifest.find("prefill_chunk");
    if (!want_chunk || want_chunk->as_int("prefill_chunk") != chunk) throw bad("prefill chunk");
    auto out = pm->output_tensor_meta(0);
    if (!out.ok() || out->sizes().size() != 1) throw bad("prefill output");
    vocab = out->sizes()[0];
  }

  std::vector<Tensor> get_adapter() {
    std::vector<Tensor> ts;
    for (const auto& v : run("get_adapter", {})) {
      const auto& t = v.toTensor();
      Tensor c;
      for (auto d : t.sizes()) c.shape.push_back(d);
      c.data.assign(t.const_data_ptr<float>(), t.const_data_ptr<float>() + t.numel());
      ts.push_back(std::move(c));
    }
    return ts;
  }

  void set_adapter(std::vector<Tensor>& bs) {
    std::vector<TensorPtr> keep;
    std::vector<EValue> inputs;
    for (auto& t : bs) {
      std::vector<executorch::aten::SizesType> sizes(t.shape.begin(), t.shape.end());
      keep.push_back(from_blob(t.data.data(), sizes, ScalarType::Float));
      inputs.emplace_back(*keep.back());
    }
    run("set_adapter", inputs);
  }

  // B from a PEFT adapter (its A must be the program's frozen A: ExecuTorchEngine.load_adapter_state), or zeros
  void load_adapter(const std::string& dir) {
    std::vector<Tensor> ab = get_adapter(), bs;
    TensorMap file;
    if (!dir.empty()) file = read_safetensors_checked(join(dir, "adapter_model.safetensors"));
    size_t used = 0;
    for (size_t k = 0; k < b->layers.size(); ++k) {
      if (dir.empty()) {
        Tensor z = ab[2 * k + 1];
        std::fill(z.data.begin(), z.data.end(), 0.f);
        bs.push_back(z);
        continue;
      }
      const std::string base = "base_model.model." + b->layers[k];
      auto a = file.find(base + ".lora_A.weight"), bt = file.find(base + ".lora_B.weight");
      if (a == file.end() || bt == file.end())
        throw Error("adapter " + dir + " does not fit this program (different adapted modules)");
      used += 2;
      for (auto [t, want] : {std::make_pair(&a->second, &ab[2 * k]), std::make_pair(&bt->second, &ab[2 * k + 1])})
        if (t->shape != want->shape)
          throw Error("adapter tensor " + b->layers[k] + " has another shape than the program needs");
      if (std::memcmp(a->second.data.data(), ab[2 * k].data.data(), a->second.data.size() * sizeof(float)) != 0)
        throw Error("adapter tensor " + b->layers[k] +
                    ".lora_A differs from the program's frozen A (different --seed or adapter)");
      bs.push_back(bt->second);
    }
    if (!dir.empty() && used != file.size())
      throw Error("adapter " + dir + " does not fit this program (different adapted modules)");
    set_adapter(bs);
  }

  std::vector<float> logits_of(const std::vector<EValue>& outs) {
    const auto& t = outs.at(0).toTensor();
    return std::vector<float>(t.const_data_ptr<float>(), t.const_data_ptr<float>() + t.numel());
  }

  // ProgramDecoder: the prompt in chunks of `chunk` (the last right-padded with 0), the logits after its last
  // token. A chunk stays inside the cache: near its end the last one starts earlier (rewriting the keys and
  // values of tokens already there).
  std::vector<float> prefill(const Ids& ids) {
    std::vector<float> logits;
    for (size_t k = 0; k < ids.size(); k += size_t(chunk)) {
      size_t start = std::min(k, size_t(b->length - chunk));
      size_t n = std::min(size_t(chunk), ids.size() - start);
      std::vector<int64_t> tokens(size_t(chunk), 0);
      std::copy_n(ids.begin() + long(start), n, tokens.begin());
      int64_t s = int64_t(start), last = int64_t(n) - 1;
      auto t = from_blob(tokens.data(), {1, int(chunk)}, ScalarType::Long);
      auto ts = from_blob(&s, {}, ScalarType::Long), tl = from_blob(&last, {}, ScalarType::Long);
      logits = logits_of(run("prefill", {EValue(*t), EValue(*ts), EValue(*tl)}));
    }
    return logits;
  }

  std::vector<float> decode(int64_t token, int64_t position) {
    int64_t zero = 0;
    auto t = from_blob(&token, {1, 1}, ScalarType::Long);
    auto tp = from_blob(&position, {}, ScalarType::Long), tz = from_blob(&zero, {}, ScalarType::Long);
    return logits_of(run("decode", {EValue(*t), EValue(*tp), EValue(*tz)}));
  }
};

// ------------------------------------------------------------------ sampling

// Greedy: torch.argmax (the first of equal maxima). Sampling is defined here, reproducible for a seed,
// and not torch's sampler (docs/native.md): p = softmax(logits / T) in double; top-p keeps the tokens,
// in descending p (ties: lower id first), whose cumulative p before them is < top_p; u = the next
// std::mt19937_64 output (seeded with --seed) >> 11, times 2^-53; the token is the first kept one, in
// ascending id, whose running sum of p exceeds u times the kept mass.
struct Sampler {
  const Sampling& cfg;
  std::mt19937_64 gen;
  explicit Sampler(const Sampling& c) : cfg(c), gen(c.seed) {}

  int64_t operator()(const std::vector<float>& logits) {
    const size_t V = logits.size();
    if (cfg.temperature == 0) {
      size_t best = 0;
      for (size_t i = 1; i < V; ++i)
        if (logits[i] > logits[best] || (std::isnan(logits[i]) && !std::isnan(logits[best]))) best = i;
      return int64_t(best);
    }
    double mx = -INFINITY;
    for (float l : logits) mx = std::max(mx, double(l));
    std::vector<double> p(V);
    double z = 0;
    for (size_t i = 0; i < V; ++i) z += p[i] = std::exp((double(logits[i]) - mx) / cfg.temperature);
    for (double& v : p) v /= z;
    std::vector<char> kept(V, 1);
    if (cfg.top_p < 1) {
      std::vector<size_t> order(V);
      for (size_t i = 0; i < V; ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
      std::fill(kept.begin(), kept.end(), 0);
      double before = 0;
      for (size_t i : order) {
        if (!(before < cfg.top_p)) break;
        kept[i] = 1;
        before += p[i];
      }
    }
    double mass = 0;
    for (size_t i = 0; i < V; ++i)
      if (kept[i]) mass += p[i];
    double u = double(gen() >> 11) * 0x1.0p-53 * mass, acc = 0;
    size_t last = 0;
    for (size_t i = 0; i < V; ++i) {
      if (!kept[i]) continue;
      acc += p[i];
      last = i;
      if (acc > u) return int64_t(i);
    }
    return int64_t(last);
  }
};

// How many trailing bytes of `text` could still begin a stop string (mobizo.generation._held_back)
size_t held_back(const std::string& text, const std::vector<std::string>& stops) {
  size_t keep = 0;
  for (const auto& s : stops) {
    for (size_t k = std::min(s.size() - 1, text.size()); k > keep; --k) {
      if (text.compare(text.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
    }
  }
  return keep;
}

struct Result {
  std::string completion, finish = "length";
  Ids tokens;
};

// mobizo.generation.stream: yield the text as it is decoded; stop at EOS, max_new_tokens or a stop string
// (never shown: text that could still become one is held back, and so is an unfinished UTF-8 character)
template <typename Emit>
Result stream(Generator& g, const TextTokenizer& tok, const Ids& ids, const Sampling& cfg, Emit emit) {
  Result r;
  std::vector<float> logits = g.prefill(ids);
  Sampler sampler(cfg);
  size_t shown = 0;
  int64_t position = int64_t(ids.size());
  auto show = [&](const std::string& piece) {
    r.completion += piece;
    emit(piece);
  };
  for (int64_t n = 0; n < cfg.max_new_tokens; ++n) {
    int64_t token = sampler(logits);
    if (tok.is_eos(token)) {
      r.finish = "eos";
      break;
    }
    r.tokens.push_back(token);
    std::string text = tok.decode(r.tokens);
    size_t cut = std::string::npos;
    for (const auto& s : cfg.stop) cut = std::min(cut, text.find(s, shown));
    if (cut != std::string::npos) {
      r.finish = "stop";
      if (cut > shown) show(text.substr(shown, cut - shown));
      return r;
    }
    size_t ready = text.size() - held_back(text, cfg.stop);
    while (ready > shown && ready >= 3 && text.compare(ready - 3, 3, FFFD) == 0) ready -= 3;
    if (ready > shown) {
      show(text.substr(shown, ready - shown));
      shown = ready;
    }
    if (n + 1 < cfg.max_new_tokens) logits = g.decode(token, position++);
  }
  std::string text = tok.decode(r.tokens);
  if (text.size() > shown) show(text.substr(shown));
  return r;
}

void write_out(const std::string& s) {
  if (std::fwrite(s.data(), 1, s.size(), stdout) != s.size() || std::fflush(stdout) != 0)
    throw Error("cannot write to stdout");
}

}  // namespace

int generate_main(int argc, char** argv) {
  GenOptions o = parse_generate(argc, argv);
  if (!o.input.empty()) {
    std::vector<std::string> more = read_prompts(o.input);
    o.prompts.insert(o.prompts.end(), more.begin(), more.end());
  }
  if (o.prompts.empty()) throw Error("nothing to generate from: give --prompt TEXT or --input FILE");
  Source src = resolve_source(o);
  Bundle b = Bundle::load(src.bundle);
  if (!src.pte_sha256.empty() && src.pte_sha256 != b.manifest.at("pte_sha256").as_string())
    throw Error("the bundle at " + src.bundle + " holds another program than the one " + o.source + " trained");
  if (!b.generate)
    throw Error("the program in " + src.bundle + " has no generation methods (exported by an earlier mobizo, or "
                "this model's generation could not be traced); re-export it");
  TextSpec spec = TextSpec::of(src.bundle, b.run);
  TextTokenizer tok(spec);
  Encoder enc(tok);

  // every prompt tokenized and checked before anything is written (mobizo.inference.prompt_token_ids)
  if (o.chat && !spec.chat_unsupported.empty())
    throw Error("the tokenizer's chat template cannot be applied on the device (" + spec.chat_unsupported +
                "); --no-chat-template feeds the prompt as it is");
  const int64_t positions = b.length;
  std::vector<Ids> prompt_ids;
  for (size_t i = 0; i < o.prompts.size(); ++i) {
    const std::string& p = o.prompts[i];
    if (!valid_utf8(p)) throw Error("--prompt is not valid UTF-8 text");
    Ids ids = enc.prompt_ids(o.chat && spec.chat ? spec.chat_prefix + p + spec.chat_suffix : p);
    const int64_t n = int64_t(ids.size()), m = o.sampling.max_new_tokens;
    std::string msg;
    if (n >= positions)
      msg = "the prompt is " + std::to_string(n) + " tokens, the program holds " + std::to_string(positions) +
            " positions: it leaves no room to generate";
    else if (n + m > positions)
      msg = "--max-new-tokens " + std::to_string(m) + " after a " + std::to_string(n) + "-token prompt goes past the " +
            std::to_string(positions) + " positions of the program (use --max-new-tokens " +
            std::to_string(positions - n) + " or less)";
    if (!msg.empty()) throw Error(o.prompts.size() > 1 ? "prompt " + std::to_string(i + 1) + ": " + msg : msg);
    prompt_ids.push_back(std::move(ids));
  }

  std::optional<executorch::extension::threadpool::NoThreadPoolGuard> one_thread;
  if (o.single_thread) one_thread.emplace();  // this thread runs every kernel and delegate (thread-local guard)
  Generator g;
  g.load(b);
  g.load_adapter(src.adapter);
  for (size_t i = 0; i < prompt_ids.size(); ++i) {
    if (!o.json && prompt_ids.size() > 1) write_out(std::string(i ? "\n" : "") + "==> prompt " + std::to_string(i + 1) + " <==\n");
    auto t0 = std::chrono::steady_clock::now();
    Result r = stream(g, tok, prompt_ids[i], o.sampling, [&](const std::string& piece) {
      if (!o.json) write_out(piece);
    });
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (o.json) {
      Json rec = Json::object();
      rec.set("prompt", Json::string(o.prompts[i]));
      rec.set("completion", Json::string(r.completion));
      rec.set("tokens", Json::integer(int64_t(r.tokens.size())));
      rec.set("finish", Json::string(r.finish));
      rec.set("seconds", Json::number(std::round(secs * 1000) / 1000));
      Json ids = Json::array();
      for (int64_t t : r.tokens) ids.push(Json::integer(t));
      rec.set("ids", ids);
      rec.set("prompt_tokens", Json::integer(int64_t(prompt_ids[i].size())));
      write_out(dump_json(rec, false, true) + "\n");
    } else {
      write_out("\n");
    }
  }
  return 0;
}

// ------------------------------------------------------------------ tokenize

// mobizo-train tokenize BUNDLE --input FILE|-: for each JSONL record {"prompt", "answer"?} one line
// {"prompt_ids", "answer_ids", "text"} (Encoder: the pair; text: the decoded ids of both) or {"error"}.
int tokenize_main(int argc, char** argv) {
  std::string bundle, input;
  for (int k = 2; k < argc; ++k) {
    std::string a = argv[k];
    if (a == "--input" && k + 1 < argc) input = argv[++k];
    else if (!a.empty() && a[0] == '-') throw Error("unknown option " + a + " (usage: mobizo-train tokenize BUNDLE --input FILE|-)");
    else if (bundle.empty()) bundle = a;
    else throw Error("unexpected argument " + a);
  }
  if (bundle.empty() || input.empty()) throw Error("usage: mobizo-train tokenize BUNDLE --input FILE|-");
  Json run;
  try {
    run = parse_json(read_file(join(bundle, "run.json")));
  } catch (const JsonError& e) {
    throw Error(join(bundle, "run.json") + ": malformed JSON (" + e.what() + ")");
  }
  TextSpec spec = TextSpec::of(bundle, run);
  TextTokenizer tok(spec);
  Encoder enc(tok);
  std::string text;
  if (input == "-") text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  else text = read_file(input);
  std::string out;
  size_t pos = 0;
  auto ids_json = [](const Ids& ids) {
    Json a = Json::array();
    for (int64_t v : ids) a.push(Json::integer(v));
    return a;
  };
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    std::string line = text.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
    pos = nl == std::string::npos ? text.size() : nl + 1;
    if (line.empty()) continue;
    Json rec = parse_json(line), res = Json::object();
    try {
      const std::string& prompt = rec.at("prompt").as_string("prompt");
      Encoded e;
      if (const Json* a = rec.find("answer")) e = enc(prompt, a->as_string("answer"));
      else e.prompt = enc.prompt_ids(prompt);
      res.set("prompt_ids", ids_json(e.prompt));
      res.set("answer_ids", ids_json(e.answer));
      Ids all = e.prompt;
      all.insert(all.end(), e.answer.begin(), e.answer.end());
      res.set("text", Json::string(tok.decode(all)));
    } catch (const Error& err) {
      res.set("error", Json::string(err.what()));
    }
    out += dump_json(res, false, true) + "\n";
  }
  write_out(out);
  return 0;
}

}  // namespace mobizo
