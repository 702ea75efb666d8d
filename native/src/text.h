// Text on the device: the bundle's tokenizer (tokenizer.json run by the pytorch-tokenizers C++
// library, HFTokenizer) wrapped to give the ids mobizo's Python side gives, and the prompt/answer
// split of mobizo.data.Encoder.
//
// run.json "text" (mobizo.bundle.text_spec) says what the library alone does not: the special ids the
// model's post-processor puts around one sequence ("prefix", "suffix": e.g. BOS), the EOS ids, the
// special ids that decoding skips, the pad id, the chat template as the text around one user
// message (when it can be written that way), and the record format of the task (records.h).
// `mobizo bundle` compared this tokenizer's ids and text with the Python tokenizer's on every text of
// the bundle before writing it; a tokenizer.json the library reads differently is refused there.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "json.h"

namespace mobizo {

using Ids = std::vector<int64_t>;

struct TextSpec {
  std::string tokenizer_path, tokenizer_sha256;
  Ids prefix, suffix, eos, special;
  int64_t pad = 0;
  bool chat = false;            // the chat template is prefix + message + suffix
  std::string chat_prefix, chat_suffix;
  std::string chat_unsupported;  // why not, for a tokenizer whose template cannot be written so ("" if none)
  Json data;                     // the record format (null: the task's records cannot be read on the device)

  // run.json["text"] of the bundle in `dir`; throws Error when the bundle has none.
  static TextSpec of(const std::string& dir, const Json& run);
};

// True when this mobizo-train was built with the tokenizer library.
bool have_tokenizer_library();
std::string tokenizer_library();  // "pytorch-tokenizers <version>", or "" without it

class TextTokenizer {
 public:
  explicit TextTokenizer(const TextSpec& spec);  // loads and checks tokenizer.json (sha256)
  ~TextTokenizer();
  TextTokenizer(const TextTokenizer&) = delete;
  TextTokenizer& operator=(const TextTokenizer&) = delete;

  // tokenizer(text, add_special_tokens=special)["input_ids"], a trailing EOS of the post-processor
  // dropped (mobizo.data.Encoder._ids)
  Ids ids(const std::string& text, bool special) const;
  // tokenizer.decode(ids, skip_special_tokens=True): the bytes, invalid UTF-8 replaced as Rust's
  // from_utf8_lossy does (one U+FFFD per maximal invalid subpart), like the tokenizers library
  std::string decode(const Ids& ids) const;
  const TextSpec& spec() const { return spec_; }
  bool is_eos(int64_t id) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  TextSpec spec_;
};

// mobizo.data.Encoder: a prompt and an answer tokenized jointly, the answer being what follows the
// prompt's tokens (leading spaces handled by the tokenizer itself, a token across the boundary
// resolved as the Python side does).
struct Encoded {
  Ids prompt, answer;
};

class Encoder {
 public:
  explicit Encoder(const TextTokenizer& tok) : tok_(tok) {}
  // throws Error("answer ... tokenizes to nothing") / ("prompt ... tokenizes to nothing")
  Encoded operator()(const std::string& prompt, const std::string& answer) const;
  Ids prompt_ids(const std::string& prompt) const;

 private:
  Ids boundary_answer(const Ids& p, const std::string& answer, const Ids& full) const;
  const TextTokenizer& tok_;
};

// Text helpers shared with the record reader and generation
std::string utf8_lossy(const std::string& bytes);
bool valid_utf8(const std::string& s);  // well-formed UTF-8 without surrogates (what Python's str holds)
bool ends_with_space(const std::string& s);  // Python: s[-1:].isspace()
std::string strip_space(const std::string& s);  // Python: s.strip()
std::string py_repr(const std::string& s);  // repr(str) for messages (quotes chosen as Python does)
std::string head_chars(const std::string& s, size_t n);  // s[:n] in characters

}  // namespace mobizo
