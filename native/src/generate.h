// The text commands of mobizo-train (text.h: the tokenizer on the device):
//
//   mobizo-train generate BUNDLE_OR_RUN (--prompt TEXT)... [--input FILE|-] [--adapter DIR] [--max-new-tokens N]
//                [--stop STR]... [--temperature T] [--top-p P] [--seed S] [--no-chat-template] [--json] [--threads 1]
//   mobizo-train tokenize BUNDLE --input FILE|-      (what `mobizo bundle` checks the tokenizer with)
//
// generate runs the program's prefill / decode methods (mobizo.engines.executorch.generate) with the
// adapter of a native run (RUN/adapter, else RUN/checkpoint) or --adapter, or the base model (B = 0) for
// a bare bundle, and streams the text to stdout as mobizo generate does (mobizo.generation.stream).
#pragma once

namespace mobizo {

int generate_main(int argc, char** argv);  // argv[1] == "generate"
int tokenize_main(int argc, char** argv);  // argv[1] == "tokenize"

}  // namespace mobizo
