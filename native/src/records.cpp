#include "records.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "fsutil.h"
#include "sha256.h"

namespace mobizo {
namespace {

constexpr int64_t IGNORE = -100;

std::string join_words(const std::vector<std::string>& words, const std::string& sep) {
  std::string out;
  for (size_t k = 0; k < words.size(); ++k) out += (k ? sep : "") + words[k];
  return out;
}

// Python's list repr of strings, for messages: ['bad', 'good']
std::string list_repr(const std::vector<std::string>& words) {
  std::string out = "[";
  for (size_t k = 0; k < words.size(); ++k) out += (k ? ", " : "") + py_repr(words[k]);
  return out + "]";
}

std::string ascii_lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
  return s;
}

// The text of a JSON value as str() gives it (mobizo.tasks.custom.render)
std::string value_text(const Json& v) {
  switch (v.type) {
    case Json::Type::String: return v.s;
    case Json::Type::Int: return std::to_string(v.i);
    case Json::Type::Float: return py_float_repr(v.d);
    case Json::Type::Bool: return v.b ? "True" : "False";
    default: return "";
  }
}

std::string type_name(const Json& v) {
  switch (v.type) {
    case Json::Type::Null: return "NoneType";
    case Json::Type::Bool: return "bool";
    case Json::Type::Int: return "int";
    case Json::Type::Float: return "float";
    case Json::Type::String: return "str";
    case Json::Type::Array: return "list";
    default: return "dict";
  }
}

std::string keys_of(const Json& rec) {
  std::vector<std::string> keys;
  for (const auto& kv : rec.o) keys.push_back(kv.first);
  return join_words(keys, ", ");
}

std::string checked_text(const std::string& s, const std::string& what) {
  if (!valid_utf8(s)) throw Error(what + " is not valid Unicode text");
  return s;
}

// The template's fields, in order (mobizo.tasks.custom.template_fields; the bundle's template was
// checked in Python: plain {name} placeholders, {{ and }} for braces)
struct Piece {
  bool field;
  std::string text;
};

std::vector<Piece> parse_template(const std::string& t) {
  std::vector<Piece> out;
  std::string lit;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] == '{' && i + 1 < t.size() && t[i + 1] == '{') {
      lit += '{';
      ++i;
    } else if (t[i] == '}' && i + 1 < t.size() && t[i + 1] == '}') {
      lit += '}';
      ++i;
    } else if (t[i] == '{') {
      size_t end = t.find('}', i);
      if (end == std::string::npos) throw Error("run.json: malformed template");
      if (!lit.empty()) out.push_back({false, lit});
      lit.clear();
      out.push_back({true, t.substr(i + 1, end - i - 1)});
      i = end;
    } else {
      lit += t[i];
    }
  }
  if (!lit.empty()) out.push_back({false, lit});
  return out;
}

std::string render(const std::vector<Piece>& tpl, const Json& rec, const std::string& where) {
  for (const auto& p : tpl)
    if (p.field && !rec.find(p.text))
      throw Error(where + ": no field " + py_repr(p.text) + " required by the template (fields: " + keys_of(rec) + ")");
  std::string out;
  for (const auto& p : tpl) {
    if (!p.field) {
      out += p.text;
      continue;
    }
    const Json& v = *rec.find(p.text);
    if (v.is_null() || v.type == Json::Type::Array || v.type == Json::Type::Object)
      throw Error(where + ": field " + py_repr(p.text) + " is " + (v.is_null() ? "empty (null)" : type_name(v)) +
                  ", expected text");
    out += checked_text(value_text(v), where + ": field " + py_repr(p.text));
  }
  return out;
}

// mobizo.tasks.base.parse_label: an int, a bool (two classes), an integral float, a decimal string, or
// one of `names` (exact, else case-insensitive)
int64_t parse_label(const Json& value, const std::vector<std::string>& names, const std::string& where,
                    const std::string& noun) {
  std::string original = value.type == Json::Type::String ? py_repr(value.s)
                         : value.type == Json::Type::Bool  ? (value.b ? "True" : "False")
                         : value.is_null()                 ? "None"
                                                           : dump_json(value);
  bool is_int = false;
  int64_t v = 0;
  if (value.type == Json::Type::Int) {
    is_int = true;
    v = value.i;
  } else if (value.type == Json::Type::Bool) {
    is_int = true;
    v = value.b ? 1 : 0;
  } else if (value.type == Json::Type::Float && value.d == double(int64_t(value.d))) {
    is_int = true;
    v = int64_t(value.d);
  } else if (value.type == Json::Type::String) {
    std::string s = strip_space(value.s);
    for (size_t k = 0; k < names.size(); ++k)
      if (names[k] == s) return int64_t(k);
    for (size_t k = 0; k < names.size(); ++k)
      if (ascii_lower(names[k]) == ascii_lower(s)) return int64_t(k);
    std::string digits = !s.empty() && s[0] == '-' ? s.substr(1) : s;
    bool decimal = !digits.empty() && std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (decimal) {
      is_int = true;
      v = digits.size() < 18 ? std::stoll(s) : (s[0] == '-' ? -1 : INT64_MAX);  // (past any class count)
    } else if (names.size() == 2 && (ascii_lower(s) == "true" || ascii_lower(s) == "false")) {
      is_int = true;
      v = ascii_lower(s) == "true" ? 1 : 0;
    }
  }
  if (!is_int)
    throw Error(where + ": label " + original + " is not one of the " + noun + " " + list_repr(names) +
                " (nor a class index)");
  if (v < 0)
    throw Error(where + ": label " + original + " means 'no label' (an unlabelled test split?); use a labelled split");
  if (v >= int64_t(names.size()))
    throw Error(where + ": label " + original + " is out of range for " + std::to_string(names.size()) + " " + noun +
                " " + list_repr(names));
  return v;
}

const std::string& text_field(const Json& rec, const std::string& key, const std::string& where) {
  const Json* v = rec.find(key);
  if (!v || v->type != Json::Type::String)
    throw Error(where + ": " + py_repr(key) + " should be a string, got " + (v ? type_name(*v) : "NoneType"));
  return v->s;
}

// One parsed record: the prompt, its candidates (or the answer) and the gold index
struct Example {
  std::string prompt;
  std::vector<std::string> candidates;
  int64_t label = -1;
  std::string target;  // prompt/completion records
  const std::string& answer() const { return candidates.empty() ? target : candidates[size_t(label)]; }
};

std::vector<std::pair<int64_t, Json>> read_json_records(const std::string& path) {
  if (!exists(path)) throw Error("--data " + path + " does not exist");
  if (is_dir(path)) throw Error("--data " + path + " is a directory, not a .jsonl file");
  std::string lower = ascii_lower(path);
  auto ends = [&](const std::string& suf) {
    return lower.size() >= suf.size() && lower.compare(lower.size() - suf.size(), suf.size(), suf) == 0;
  };
  if (!ends(".jsonl") && !ends(".json"))
    throw Error("--data " + path + ": unsupported data file type (mobizo-train reads .jsonl, or .json holding an array)");
  std::string text = read_file(path);
  if (!valid_utf8(text)) {
    std::string ok = utf8_lossy(text);
    size_t k = 0;
    while (k < text.size() && k < ok.size() && text[k] == ok[k]) ++k;
    throw Error(path + ": not valid UTF-8 text (byte offset " + std::to_string(k) + ")");
  }
  std::vector<std::pair<int64_t, Json>> rows;
  size_t first = text.find_first_not_of(" \t\r\n");
  if (ends(".json") && first != std::string::npos && text[first] == '[') {
    Json arr;
    try {
      arr = parse_json(text);
    } catch (const JsonError& e) {
      throw Error(path + ": malformed JSON: " + e.what());
    }
    int64_t i = 0;
    for (auto& v : arr.a) rows.emplace_back(++i, std::move(v));
  } else {
    size_t pos = 0;
    int64_t lineno = 0;
    while (pos <= text.size()) {
      size_t nl = text.find('\n', pos);
      std::string line = text.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
      pos = nl == std::string::npos ? text.size() + 1 : nl + 1;
      ++lineno;
      if (strip_space(line).empty()) continue;
      try {
        rows.emplace_back(lineno, parse_json(line));
      } catch (const JsonError& e) {
        throw Error(path + ":" + std::to_string(lineno) + ": malformed JSON line: " + e.what());
      }
    }
  }
  if (rows.empty()) throw Error(path + ": no records (empty file)");
  int64_t i = 0;
  for (const auto& r : rows) {
    ++i;
    if (r.second.type != Json::Type::Object)
      throw Error(path + ": record " + std::to_string(i) + " is " + type_name(r.second) + ", expected a JSON object");
  }
  return rows;
}

}  // namespace

Examples read_examples(const Bundle& b, const TextSpec& spec, const Encoder& enc, const std::string& path) {
  const Json& d = spec.data;
  if (d.is_null())
    throw Error("--data: this bundle's task has no record format the device can read (its records are read by "
                "Python code); bundle a --task custom run to train on new records");
  std::string kind, truncation;
  int64_t max_length = 0;
  std::vector<Piece> tpl;
  std::vector<std::string> words;
  Examples out;
  try {
    kind = d.at("records").as_string("records");
    max_length = d.at("max_length").as_int("max_length");
    truncation = d.at("truncation").as_string("truncation");
    out.seed = d.at("seed").as_int("seed");
    if (kind == "classification" || kind == "multiple_choice") tpl = parse_template(d.at("template").as_string("template"));
    if (kind == "classification")
      for (const auto& w : d.at("label_words").a) words.push_back(w.as_string("label_words"));
  } catch (const JsonError& e) {
    throw Error(std::string("bundle run.json \"text\".\"data\": ") + e.what());
  }
  if (kind != "classification" && kind != "multiple_choice" && kind != "prompt_completion")
    throw Error("bundle run.json: unknown record format " + kind);

  // 1. records -> examples (mobizo.tasks.custom)
  std::vector<Example> exs;
  int64_t i = 0;
  for (auto& [lineno, rec] : read_json_records(path)) {
    (void)lineno;
    std::string where = path + " record " + std::to_string(++i);
    Example ex;
    if (kind == "classification") {
      if (!rec.find("label")) throw Error(where + ": missing 'label' field");
      ex.prompt = render(tpl, rec, where);
      for (const auto& w : words) ex.candidates.push_back(" " + w);
      ex.label = parse_label(*rec.find("label"), words, where, "label words");
    } else if (kind == "multiple_choice") {
      const Json* ch = rec.find("choices");
      bool ok = ch && ch->type == Json::Type::Array && ch->a.size() >= 2 &&
                std::all_of(ch->a.begin(), ch->a.end(), [](const Json& c) { return c.type == Json::Type::String; });
      if (!ok) throw Error(where + ": 'choices' should be a list of at least two strings");
      std::vector<std::string> choices;
      for (const auto& c : ch->a) choices.push_back(checked_text(strip_space(c.s), where + ": a choice"));
      std::vector<std::string> sorted = choices;
      std::sort(sorted.begin(), sorted.end());
      if (std::any_of(choices.begin(), choices.end(), [](const std::string& c) { return c.empty(); }) ||
          std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
        throw Error(where + ": choices must be non-empty and distinct, got " + list_repr(choices));
      const Json* answer = rec.find("answer");
      if (!answer) throw Error(where + ": missing 'answer' (the index of the right choice, or its text)");
      Json a = *answer;
      if (a.type == Json::Type::String &&
          std::find(choices.begin(), choices.end(), strip_space(a.s)) != choices.end())
        a = Json::string(strip_space(a.s));
      ex.label = parse_label(a, choices, where, "choices");
      ex.prompt = render(tpl, rec, where);
      for (const auto& c : choices) ex.candidates.push_back(" " + c);
    } else {
      if (rec.find("messages"))
        throw Error(where + ": chat records ('messages') need the model's chat template, which mobizo-train does "
                            "not render; give 'prompt' and 'completion' fields");
      if (!(rec.find("prompt") && rec.find("completion")))
        throw Error(where + ": expected 'prompt' and 'completion' fields, or 'messages' (fields: " + keys_of(rec) + ")");
      ex.target = checked_text(text_field(rec, "completion", where), where + ": 'completion'");
      if (strip_space(ex.target).empty()) throw Error(where + ": empty 'completion'");
      ex.prompt = checked_text(text_field(rec, "prompt", where), where + ": 'prompt'");
    }
    exs.push_back(std::move(ex));
  }

  // 2. tokenize (mobizo.data.check_candidates, count_truncated), then collate each example on its own
  // to the program's T and K (mobizo.bundle.collate_examples)
  const int64_t N = int64_t(exs.size()), R = b.rows_per_example, T = b.length, K = b.answer_len;
  const int64_t limit = std::min(max_length, T);
  out.n = N;
  out.ids.assign(size_t(N * R * T), spec.pad);
  out.mask.assign(size_t(N * R * T), 0);
  out.labels.assign(size_t(N * R * K), IGNORE);
  out.real_rows.assign(size_t(N), 1);
  out.gold.assign(size_t(N), IGNORE);
  int64_t truncated = 0;
  auto put_row = [&](int64_t e, int64_t r, const Ids& seq) {
    size_t at = size_t((e * R + r) * T + (T - int64_t(seq.size())));
    std::copy(seq.begin(), seq.end(), out.ids.begin() + long(at));
    std::fill(out.mask.begin() + long(at), out.mask.begin() + long(at + seq.size()), 1);
  };
  for (int64_t e = 0; e < N; ++e) {
    const Example& ex = exs[size_t(e)];
    std::string where = path + " record " + std::to_string(e + 1);
    std::vector<Encoded> encs;
    std::vector<std::string> answers = ex.candidates.empty() ? std::vector<std::string>{ex.target} : ex.candidates;
    bool choice = b.choice;
    if (!choice && !ex.candidates.empty()) answers = {ex.answer()};  // --objective answer on a choice task
    for (const auto& a : answers) {
      try {
        encs.push_back(enc(ex.prompt, a));
      } catch (const Error& err) {
        std::string msg = err.what();
        if (msg.find("tokenizes to nothing") == std::string::npos) throw;
        std::string which = msg.rfind("prompt", 0) == 0 ? "prompt " + py_repr(head_chars(ex.prompt, 40))
                            : ex.candidates.empty()      ? "answer " + py_repr(a)
                                                         : "candidate " + py_repr(a);
        throw Error(where + ": " + which +
                    " tokenizes to no tokens with this tokenizer (give label words / answers with visible text)");
      }
    }
    bool cut = false;
    for (const auto& en : encs) {
      if (int64_t(en.answer.size()) + 1 > max_length)
        throw Error(where + ": an answer of " + std::to_string(en.answer.size()) + " tokens does not fit --max-length " +
                    std::to_string(max_length));
      cut = cut || int64_t(en.prompt.size() + en.answer.size()) > max_length;
    }
    if (cut) {
      ++truncated;
      if (truncation == "error")
        throw Error(where + ": a prompt of " + std::to_string(encs[0].prompt.size()) +
                    " tokens is longer than --max-length " + std::to_string(max_length) +
                    " allows (raise --max-length or use --truncation left)");
    }
    if (choice && int64_t(encs.size()) > b.choices)
      throw Error(where + ": an example has " + std::to_string(encs.size()) + " candidates; the program was built for " +
                  std::to_string(b.choices));
    if (choice) out.gold[size_t(e)] = ex.label;
    if (b.shared) {  // mobizo.data._collate_shared: one prompt row, the candidates' token ids as labels
      if (limit < 2)
        throw Error("--max-length " + std::to_string(limit) + " leaves no room for a prompt before a one-token answer");
      Ids p = encs[0].prompt;
      for (const auto& en : encs) {
        if (en.answer.size() != 1) throw Error(where + ": a shared-prompt batch needs candidates of one token each");
        if (en.prompt != p)
          throw Error(where + ": candidates of one example tokenize with different prompts; cannot share the prompt");
      }
      if (int64_t(p.size()) + 1 > limit) p.erase(p.begin(), p.begin() + long(int64_t(p.size()) + 1 - limit));
      put_row(e, 0, p);
      for (size_t c = 0; c < encs.size(); ++c) out.labels[size_t(e * K) + c] = encs[c].answer[0];
      continue;
    }
    // mobizo.data.collate: prompts lose tokens on the left; answers are right-aligned in the K window
    std::vector<Ids> seqs;
    for (const auto& en : encs) {
      if (int64_t(en.answer.size()) > b.program_answer_len)
        throw Error(where + ": an answer of " + std::to_string(en.answer.size()) +
                    " tokens is longer than the program's answer window of " + std::to_string(b.program_answer_len) +
                    " tokens");
      if (int64_t(en.answer.size()) + 1 > limit)
        throw Error(where + ": an answer of " + std::to_string(en.answer.size()) + " tokens does not fit --max-length " +
                    std::to_string(limit) + " with its prompt");
      Ids p = en.prompt;
      if (int64_t(p.size() + en.answer.size()) > limit)
        p.erase(p.begin(), p.begin() + long(int64_t(p.size() + en.answer.size()) - limit));
      p.insert(p.end(), en.answer.begin(), en.answer.end());
      seqs.push_back(std::move(p));
    }
    out.real_rows[size_t(e)] = int64_t(encs.size());
    for (int64_t r = 0; r < R; ++r) {
      bool real = r < int64_t(encs.size());
      put_row(e, r, seqs[size_t(real ? r : 0)]);  // a filler row repeats the first sequence, unsupervised
      if (real) {
        const Ids& a = encs[size_t(r)].answer;
        size_t at = size_t((e * R + r) * K + (K - int64_t(a.size())));
        std::copy(a.begin(), a.end(), out.labels.begin() + long(at));
      }
    }
  }
  if (truncated)  // a warning, as mobizo train gives it (--quiet only silences progress)
    std::fprintf(stderr,
                 "mobizo-train: warning: %lld of %lld --data examples exceed --max-length %lld; their prompts are "
                 "truncated from the left\n",
                 (long long)truncated, (long long)N, (long long)max_length);
  out.file = path;
  out.sha256 = sha256_hex(read_file(path));
  return out;
}

}  // namespace mobizo
