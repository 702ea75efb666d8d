#include "text.h"

#include <algorithm>

#include "fsutil.h"
#include "sha256.h"

#ifdef MOBIZO_HAVE_TOKENIZERS
#include <pytorch/tokenizers/hf_tokenizer.h>
#endif

#ifndef MOBIZO_TOKENIZERS_VERSION
#define MOBIZO_TOKENIZERS_VERSION ""
#endif

namespace mobizo {

// ------------------------------------------------------------------ UTF-8 helpers

namespace {

// One code point at s[i] (advancing i); U+FFFD for a malformed sequence (not reached on valid text)
uint32_t next_cp(const std::string& s, size_t& i) {
  unsigned char c = s[i];
  int n = c < 0x80 ? 0 : c < 0xE0 ? 1 : c < 0xF0 ? 2 : 3;
  uint32_t cp = n == 0 ? c : n == 1 ? (c & 0x1F) : n == 2 ? (c & 0x0F) : (c & 0x07);
  ++i;
  for (int k = 0; k < n && i < s.size(); ++k, ++i) cp = (cp << 6) | (static_cast<unsigned char>(s[i]) & 0x3F);
  return cp;
}

// str.isspace() of one character (Python: bidirectional type WS, B or S, or category Zs)
bool is_space_cp(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Code point boundaries of a valid UTF-8 string
std::vector<size_t> cp_starts(const std::string& s) {
  std::vector<size_t> out;
  for (size_t i = 0; i < s.size();) {
    out.push_back(i);
    next_cp(s, i);
  }
  return out;
}

}  // namespace

std::string utf8_lossy(const std::string& s) {
  static const char REPLACEMENT[] = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(s.size());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    unsigned char b = s[i];
    if (b < 0x80) {
      out += char(b);
      ++i;
      continue;
    }
    // the well-formed sequences of Unicode's table 3-7: the second byte's range depends on the first
    int need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) need = 1;
    else if (b == 0xE0) need = 2, lo = 0xA0;
    else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) need = 2;
    else if (b == 0xED) need = 2, hi = 0x9F;
    else if (b == 0xF0) need = 3, lo = 0x90;
    else if (b >= 0xF1 && b <= 0xF3) need = 3;
    else if (b == 0xF4) need = 3, hi = 0x8F;
    if (need == 0) {  // a byte that starts nothing
      out += REPLACEMENT;
      ++i;
      continue;
    }
    size_t j = i + 1;
    bool ok = true;
    for (int k = 0; k < need; ++k, ++j) {
      unsigned char c = j < n ? static_cast<unsigned char>(s[j]) : 0;
      if (j >= n || c < (k == 0 ? lo : 0x80) || c > (k == 0 ? hi : 0xBF)) {
        ok = false;
        break;
      }
    }
    if (ok) out.append(s, i, j - i);
    else out += REPLACEMENT;  // the maximal invalid subpart is one replacement character
    i = j;
  }
  return out;
}

bool valid_utf8(const std::string& s) { return utf8_lossy(s) == s; }

std::string head_chars(const std::string& s, size_t n) {
  std::vector<size_t> starts = cp_starts(s);
  return starts.size() <= n ? s : s.substr(0, starts[n]);
}

bool ends_with_space(const std::string& s) {
  if (s.empty()) return false;
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return is_space_cp(next_cp(s, i));
}

std::string strip_space(const std::string& s) {
  std::vector<size_t> starts = cp_starts(s);
  size_t a = 0, b = starts.size();
  auto cp_at = [&](size_t k) {
    size_t i = starts[k];
    return next_cp(s, i);
  };
  while (a < b && is_space_cp(cp_at(a))) ++a;
  while (b > a && is_space_cp(cp_at(b - 1))) --b;
  size_t from = a < starts.size() ? starts[a] : s.size();
  size_t to = b < starts.size() ? starts[b] : s.size();
  return s.substr(from, to - from);
}

std::string py_repr(const std::string& s) {
  char q = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\' || c == static_cast<unsigned char>(q)) out += '\\', out += char(c);
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else out += char(c);
  }
  return out + q;
}

// ------------------------------------------------------------------ the spec

static Ids id_list(const Json& j, const std::string& what) {
  Ids out;
  for (const auto& v : j.a) out.push_back(v.as_int(what));
  return out;
}

TextSpec TextSpec::of(const std::string& dir, const Json& run) {
  const Json* t = run.find("text");
  if (!t || t->is_null())
    throw Error("the bundle " + dir +
                " carries no tokenizer (written by an earlier mobizo, or with --no-tokenizer): write it again with "
                "mobizo bundle");
  TextSpec s;
  try {
    const Json& tok = t->at("tokenizer");
    s.tokenizer_path = join(dir, tok.at("file").as_string("text.tokenizer.file"));
    s.tokenizer_sha256 = tok.at("sha256").as_string("text.tokenizer.sha256");
    s.prefix = id_list(tok.at("prefix"), "text.tokenizer.prefix");
    s.suffix = id_list(tok.at("suffix"), "text.tokenizer.suffix");
    s.eos = id_list(tok.at("eos"), "text.tokenizer.eos");
    s.special = id_list(tok.at("special"), "text.tokenizer.special");
    s.pad = tok.at("pad").as_int("text.tokenizer.pad");
    const Json& chat = t->at("chat");
    if (chat.type == Json::Type::Object) {
      if (const Json* why = chat.find("unsupported")) {
        s.chat_unsupported = why->as_string("text.chat.unsupported");
      } else {
        s.chat = true;
        s.chat_prefix = chat.at("prefix").as_string("text.chat.prefix");
        s.chat_suffix = chat.at("suffix").as_string("text.chat.suffix");
      }
    }
    s.data = t->at("data");
  } catch (const JsonError& e) {
    throw Error("bundle " + dir + ": run.json \"text\": " + e.what());
  }
  return s;
}

// ------------------------------------------------------------------ the tokenizer

bool have_tokenizer_library() {
#ifdef MOBIZO_HAVE_TOKENIZERS
  return true;
#else
  return false;
#endif
}

std::string tokenizer_library() {
  return have_tokenizer_library() ? std::string("pytorch-tokenizers ") + MOBIZO_TOKENIZERS_VERSION : std::string();
}

#ifdef MOBIZO_HAVE_TOKENIZERS
struct TextTokenizer::Impl {
  tokenizers::HFTokenizer tok;
};
#else
struct TextTokenizer::Impl {};
#endif

TextTokenizer::TextTokenizer(const TextSpec& spec) : spec_(spec) {
#ifndef MOBIZO_HAVE_TOKENIZERS
  throw Error(
      "this mobizo-train was built without the tokenizer library (pytorch-tokenizers): build it with `mobizo native "
      "build` (the default) to generate or read text on the device");
#else
  if (!is_file(spec.tokenizer_path)) throw Error("the bundle is missing " + base_name(spec.tokenizer_path));
  if (sha256_hex(read_file(spec.tokenizer_path)) != spec.tokenizer_sha256)
    throw Error(spec.tokenizer_path + " is truncated or corrupted (its sha256 does not match run.json)");
  impl_ = std::make_unique<Impl>();
  if (impl_->tok.load(spec.tokenizer_path) != tokenizers::Error::Ok)
    throw Error("the tokenizer library cannot read " + spec.tokenizer_path);
#endif
}

TextTokenizer::~TextTokenizer() = default;

bool TextTokenizer::is_eos(int64_t id) const {
  return std::find(spec_.eos.begin(), spec_.eos.end(), id) != spec_.eos.end();
}

Ids TextTokenizer::ids(const std::string& text, bool special) const {
  Ids out;
#ifdef MOBIZO_HAVE_TOKENIZERS
  auto r = impl_->tok.encode(text, 0, 0);
  if (!r.ok()) throw Error("the tokenizer cannot encode " + py_repr(head_chars(text, 40)));
  if (special) out = spec_.prefix;
  for (uint64_t v : *r) out.push_back(int64_t(v));
  if (special) out.insert(out.end(), spec_.suffix.begin(), spec_.suffix.end());
#else
  (void)text;
  (void)special;
#endif
  return out;
}

std::string TextTokenizer::decode(const Ids& ids) const {
  std::string bytes;
#ifdef MOBIZO_HAVE_TOKENIZERS
  for (int64_t id : ids) {
    if (std::find(spec_.special.begin(), spec_.special.end(), id) != spec_.special.end()) continue;
    auto r = impl_->tok.decode(0, uint64_t(id));
    if (!r.ok()) throw Error("the tokenizer cannot decode token " + std::to_string(id));
    bytes += *r;
  }
#else
  (void)ids;
#endif
  return utf8_lossy(bytes);
}

// ------------------------------------------------------------------ Encoder (mobizo.data.Encoder)

static bool starts_with(const Ids& x, const Ids& prefix) {
  return x.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), x.begin());
}

Encoded Encoder::operator()(const std::string& prompt, const std::string& answer_in) const {
  std::string answer = answer_in;
  if (ends_with_space(prompt) && !answer.empty() && answer[0] == ' ') answer.erase(0, 1);
  Ids p = tok_.ids(prompt, true);
  Ids full = tok_.ids(prompt + answer, true);
  Ids a;
  if (full.size() > p.size() && starts_with(full, p)) a.assign(full.begin() + long(p.size()), full.end());
  else a = boundary_answer(p, answer, full);
  if (a.empty()) throw Error("answer " + py_repr(answer) + " tokenizes to nothing");
  if (p.empty()) throw Error("prompt " + py_repr(head_chars(prompt, 40)) + " tokenizes to nothing");
  return {p, a};
}

// A token across the prompt/answer boundary: the answer tokenized after a neutral anchor, the first
// candidate that decodes (after the prompt) to the joint text (Encoder._boundary_answer)
Ids Encoder::boundary_answer(const Ids& p, const std::string& answer, const Ids& full) const {
  std::vector<Ids> options;
  for (const char* anchor : {"\n", "a", "0", "."}) {
    Ids base = tok_.ids(anchor, false), joint = tok_.ids(anchor + answer, false);
    if (joint.size() > base.size() && starts_with(joint, base)) options.emplace_back(joint.begin() + long(base.size()), joint.end());
  }
  options.push_back(tok_.ids(answer, false));
  std::string want = tok_.decode(full);
  for (const Ids& a : options) {
    if (a.empty()) continue;
    Ids pa = p;
    pa.insert(pa.end(), a.begin(), a.end());
    if (tok_.decode(pa) == want) return a;
  }
  return options[0];
}

Ids Encoder::prompt_ids(const std::string& prompt) const {
  Ids ids = tok_.ids(prompt, true);
  if (ids.empty()) throw Error("prompt " + py_repr(head_chars(prompt, 40)) + " tokenizes to nothing");
  return ids;
}

}  // namespace mobizo
