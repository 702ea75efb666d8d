#include "json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace mobizo {

const Json* Json::find(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& kv : o)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

Json& Json::set(const std::string& key, Json v) {
  for (auto& kv : o)
    if (kv.first == key) return kv.second = std::move(v);
  o.emplace_back(key, std::move(v));
  return o.back().second;
}

const Json& Json::at(const std::string& key) const {
  const Json* v = find(key);
  if (!v) throw JsonError("missing field '" + key + "'");
  return *v;
}

int64_t Json::as_int(const std::string& what) const {
  if (type != Type::Int) throw JsonError(what + " must be an integer");
  return i;
}

double Json::as_double(const std::string& what) const {
  if (type == Type::Int) return double(i);
  if (type != Type::Float) throw JsonError(what + " must be a number");
  return d;
}

const std::string& Json::as_string(const std::string& what) const {
  if (type != Type::String) throw JsonError(what + " must be a string");
  return s;
}

bool Json::as_bool(const std::string& what) const {
  if (type != Type::Bool) throw JsonError(what + " must be true or false");
  return b;
}

// ------------------------------------------------------------------ parser

namespace {

struct Parser {
  const std::string& t;
  size_t p = 0;
  int depth = 0;

  [[noreturn]] void fail(const std::string& msg) const {
    throw JsonError(msg + " at offset " + std::to_string(p));
  }
  void ws() {
    while (p < t.size() && (t[p] == ' ' || t[p] == '\t' || t[p] == '\n' || t[p] == '\r')) ++p;
  }
  bool lit(const char* s) {
    size_t n = std::strlen(s);
    if (t.compare(p, n, s) == 0) {
      p += n;
      return true;
    }
    return false;
  }
  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (p + 4 > t.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = t[p++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string str() {
    if (t[p] != '"') fail("expected a string");
    ++p;
    std::string out;
    while (true) {
      if (p >= t.size()) fail("unterminated string");
      char c = t[p++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (p >= t.size()) fail("unterminated string");
      char e = t[p++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && t.compare(p, 2, "\\u") == 0) {
            size_t save = p;
            p += 2;
            uint32_t lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else p = save;
          }
          utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
    return out;
  }
  Json num() {
    size_t start = p;
    bool is_float = false;
    if (t[p] == '-') ++p;
    if (lit("Infinity")) return Json::number(t[start] == '-' ? -INFINITY : INFINITY);
    if (p >= t.size() || !std::isdigit(static_cast<unsigned char>(t[p]))) fail("bad number");
    while (p < t.size() && std::isdigit(static_cast<unsigned char>(t[p]))) ++p;
    if (p < t.size() && t[p] == '.') {
      is_float = true;
      ++p;
      if (p >= t.size() || !std::isdigit(static_cast<unsigned char>(t[p]))) fail("bad number");
      while (p < t.size() && std::isdigit(static_cast<unsigned char>(t[p]))) ++p;
    }
    if (p < t.size() && (t[p] == 'e' || t[p] == 'E')) {
      is_float = true;
      ++p;
      if (p < t.size() && (t[p] == '+' || t[p] == '-')) ++p;
      if (p >= t.size() || !std::isdigit(static_cast<unsigned char>(t[p]))) fail("bad number");
      while (p < t.size() && std::isdigit(static_cast<unsigned char>(t[p]))) ++p;
    }
    std::string tok = t.substr(start, p - start);
    if (is_float) return Json::number(std::strtod(tok.c_str(), nullptr));  // correctly rounded (glibc)
    int64_t v = 0;
    auto r = std::from_chars(tok.data(), tok.data() + tok.size(), v);
    if (r.ec != std::errc()) fail("integer out of range");
    return Json::integer(v);
  }
  Json value() {
    ws();
    if (p >= t.size()) fail("unexpected end of JSON");
    if (++depth > 200) fail("nesting too deep");
    Json out;
    char c = t[p];
    if (c == '{') {
      ++p;
      out = Json::object();
      ws();
      if (p < t.size() && t[p] == '}') {
        ++p;
      } else {
        while (true) {
          ws();
          if (p >= t.size()) fail("unterminated object");
          std::string k = str();
          ws();
          if (p >= t.size() || t[p] != ':') fail("expected ':'");
          ++p;
          out.set(k, value());
          ws();
          if (p < t.size() && t[p] == ',') { ++p; continue; }
          if (p < t.size() && t[p] == '}') { ++p; break; }
          fail("expected ',' or '}'");
        }
      }
    } else if (c == '[') {
      ++p;
      out = Json::array();
      ws();
      if (p < t.size() && t[p] == ']') {
        ++p;
      } else {
        while (true) {
          out.push(value());
          ws();
          if (p < t.size() && t[p] == ',') { ++p; continue; }
          if (p < t.size() && t[p] == ']') { ++p; break; }
          fail("expected ',' or ']'");
        }
      }
    } else if (c == '"') {
      out = Json::string(str());
    } else if (lit("true")) {
      out = Json::boolean(true);
    } else if (lit("false")) {
      out = Json::boolean(false);
    } else if (lit("null")) {
      out = Json::null();
    } else if (lit("NaN")) {
      out = Json::number(NAN);
    } else if (c == '-' || c == 'I' || std::isdigit(static_cast<unsigned char>(c))) {
      out = num();
    } else {
      fail("unexpected character");
    }
    --depth;
    return out;
  }
};

void dump_string(std::string& out, const std::string& s) {
  static const char* hex = "0123456789abcdef";
  auto u = [&](uint32_t v) {
    out += "\\u";
    for (int k = 12; k >= 0; k -= 4) out += hex[(v >> k) & 0xF];
  };
  out += '"';
  for (size_t k = 0; k < s.size();) {
    unsigned char c = s[k];
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20 || c == 0x7f) u(c);  // Python escapes DEL too with ensure_ascii
          else out += char(c);
      }
      ++k;
      continue;
    }
    // decode one UTF-8 sequence; ensure_ascii writes \uXXXX (a surrogate pair above the BMP)
    int n = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : 1;
    uint32_t cp = c & (0x3F >> n);
    for (int m = 1; m <= n && k + m < s.size(); ++m) cp = (cp << 6) | (static_cast<unsigned char>(s[k + m]) & 0x3F);
    k += n + 1;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      u(0xD800 + (cp >> 10));
      u(0xDC00 + (cp & 0x3FF));
    } else {
      u(cp);
    }
  }
  out += '"';
}

void dump(std::string& out, const Json& v, bool sort_keys, bool strict) {
  switch (v.type) {
    case Json::Type::Null: out += "null"; break;
    case Json::Type::Bool: out += v.b ? "true" : "false"; break;
    case Json::Type::Int: out += std::to_string(v.i); break;
    case Json::Type::Float:
      if (strict && !std::isfinite(v.d)) out += "null";
      else out += py_float_repr(v.d);
      break;
    case Json::Type::String: dump_string(out, v.s); break;
    case Json::Type::Array:
      out += '[';
      for (size_t k = 0; k < v.a.size(); ++k) {
        if (k) out += ", ";
        dump(out, v.a[k], sort_keys, strict);
      }
      out += ']';
      break;
    case Json::Type::Object: {
      std::vector<const std::pair<std::string, Json>*> items;
      for (const auto& kv : v.o) items.push_back(&kv);
      if (sort_keys)  // UTF-8 byte order is code point order, which is how Python sorts str keys
        std::stable_sort(items.begin(), items.end(), [](auto* x, auto* y) { return x->first < y->first; });
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += ", ";
        dump_string(out, items[k]->first);
        out += ": ";
        dump(out, items[k]->second, sort_keys, strict);
      }
      out += '}';
      break;
    }
  }
}

}  // namespace

Json parse_json(const std::string& text) {
  Parser ps{text};
  Json v = ps.value();
  ps.ws();
  if (ps.p != text.size()) ps.fail("extra data after JSON value");
  return v;
}

std::string dump_json(const Json& v, bool sort_keys, bool strict) {
  std::string out;
  dump(out, v, sort_keys, strict);
  return out;
}

std::string py_float_repr(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (v == 0.0) return std::signbit(v) ? "-0.0" : "0.0";
  // Shortest round-trip digits, as "d.ddde[+-]XX"; then Python's layout rules (float_repr_style
  // 'short', mode 'r'): scientific when the decimal exponent is < -4 or >= 16, else positional.
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, std::abs(v), std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  size_t epos = sci.find('e');
  std::string digits;
  for (size_t k = 0; k < epos; ++k)
    if (sci[k] != '.') digits += sci[k];
  int exp10 = std::atoi(sci.c_str() + epos + 1);
  std::string out = v < 0 ? "-" : "";
  int decpt = exp10 + 1;  // position of the decimal point relative to the digits
  int nd = int(digits.size());
  if (decpt <= -4 || decpt > 16) {
    out += digits[0];
    if (nd > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += e;
  } else if (decpt <= 0) {
    out += "0." + std::string(-decpt, '0') + digits;
  } else if (decpt < nd) {
    out += digits.substr(0, decpt) + "." + digits.substr(decpt);
  } else {
    out += digits + std::string(decpt - nd, '0') + ".0";
  }
  return out;
}

bool json_equal(const Json& x, const Json& y) {
  if (x.type != y.type) return false;
  switch (x.type) {
    case Json::Type::Null: return true;
    case Json::Type::Bool: return x.b == y.b;
    case Json::Type::Int: return x.i == y.i;
    case Json::Type::Float: return x.d == y.d || (std::isnan(x.d) && std::isnan(y.d));
    case Json::Type::String: return x.s == y.s;
    case Json::Type::Array:
      if (x.a.size() != y.a.size()) return false;
      for (size_t k = 0; k < x.a.size(); ++k)
        if (!json_equal(x.a[k], y.a[k])) return false;
      return true;
    case Json::Type::Object:
      if (x.o.size() != y.o.size()) return false;
      for (const auto& kv : x.o) {
        const Json* other = y.find(kv.first);
        if (!other || !json_equal(kv.second, *other)) return false;
      }
      return true;
  }
  return false;
}

}  // namespace mobizo
