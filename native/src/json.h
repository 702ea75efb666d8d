// A small JSON value with a parser and a writer that reproduces Python's json.dumps.
//
// mobizo's files are written by Python (manifest.json, run.json) and read back by Python
// (metrics.jsonl, state.json, safetensors headers), and a legacy (format 1) checkpoint's state.json
// carries a sha256 of json.dumps(state, sort_keys=True), which --resume still checks (format 2
// checksums the files' bytes: sums.h). So numbers keep Python's int/float distinction, floats
// print as Python's repr (shortest round-trip), strings are escaped as with ensure_ascii=True,
// and Python's non-standard Infinity/NaN tokens are accepted on input.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mobizo {

struct Json {
  enum class Type { Null, Bool, Int, Float, String, Array, Object };
  Type type = Type::Null;
  bool b = false;
  int64_t i = 0;
  double d = 0.0;
  std::string s;
  std::vector<Json> a;
  std::vector<std::pair<std::string, Json>> o;  // insertion order, like a Python dict

  Json() = default;
  static Json null() { return Json(); }
  static Json boolean(bool v) { Json j; j.type = Type::Bool; j.b = v; return j; }
  static Json integer(int64_t v) { Json j; j.type = Type::Int; j.i = v; return j; }
  static Json number(double v) { Json j; j.type = Type::Float; j.d = v; return j; }
  static Json string(std::string v) { Json j; j.type = Type::String; j.s = std::move(v); return j; }
  static Json array() { Json j; j.type = Type::Array; return j; }
  static Json object() { Json j; j.type = Type::Object; return j; }

  bool is_null() const { return type == Type::Null; }
  bool is_number() const { return type == Type::Int || type == Type::Float; }
  const Json* find(const std::string& key) const;  // nullptr if absent or not an object
  Json& set(const std::string& key, Json v);        // replaces or appends
  Json& push(Json v) { a.push_back(std::move(v)); return a.back(); }

  // Typed access; throw JsonError naming `what` when the value has another type.
  const Json& at(const std::string& key) const;
  int64_t as_int(const std::string& what = "value") const;
  double as_double(const std::string& what = "value") const;
  const std::string& as_string(const std::string& what = "value") const;
  bool as_bool(const std::string& what = "value") const;
};

struct JsonError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

Json parse_json(const std::string& text);  // throws JsonError
// Python's json.dumps(v, sort_keys=sort_keys) (default separators ", " and ": ").
// With strict, non-finite floats are written as null (what a strict JSON reader accepts).
std::string dump_json(const Json& v, bool sort_keys = false, bool strict = false);
std::string py_float_repr(double v);  // Python's repr(float)
bool json_equal(const Json& x, const Json& y);  // deep equality (object key order ignored)

}  // namespace mobizo
