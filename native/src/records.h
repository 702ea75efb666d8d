// Training examples from a plain JSONL of records (`mobizo-train BUNDLE --data FILE`), tokenized on the
// device and collated exactly as `mobizo bundle` collates the task's examples (mobizo.bundle.
// collate_examples over mobizo.data.collate / collate_choices), so a record gives the rows that the
// same record bundled in Python gives. The record format is the bundle's task's (run.json
// "text"."data", written by mobizo.bundle.text_spec):
//
//   classification     the template's fields + "label" (a label word, case-insensitive, or its index):
//                      custom-cls (--template, --label-words) and the synthetic task
//   multiple_choice    the template's fields + "choices" (>= 2 strings) + "answer" (index or text): custom-mc
//   prompt_completion  "prompt" + "completion" strings: --task custom
//
// Batches: step s takes the examples mobizo.data.step_indices(N, B, s, seed) names (Python's own order,
// reproduced in pyrandom.cpp), with N the file's records and seed the bundle's --seed.
#pragma once

#include <string>

#include "bundle.h"
#include "text.h"

namespace mobizo {

// Read, check and collate every record of `path` (.jsonl, or .json holding an array); errors are one
// line naming the record. Warns on stderr how many prompts were cut from the left.
Examples read_examples(const Bundle& b, const TextSpec& spec, const Encoder& enc, const std::string& path);

}  // namespace mobizo
