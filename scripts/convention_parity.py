"""rmjax vs transformers (PyTorch, CPU) on the scoring convention: prints the worst |difference|
per path, absolute and relative to the largest reward (docs/interop.md quotes it).

  python scripts/convention_parity.py [--workdir=/tmp/rmjax_convention]

* hub: a random Qwen2 sequence classifier whose pad is its EOS (tests/test_convention.py), scored
  by ``rmjax.score`` (batch 1 and 16) against ``model(**tokenizer(...))`` per line: text,
  prompt/response, chat messages; and, for contrast, with the 'rmjax' convention.
* export: that model exported from an rmjax-convention run, read by plain transformers with right
  and left padding and by ``pipeline(function_to_apply="none")``; and, for contrast, with the
  original tokenizer (no EOS appended).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from rmjax import sharding  # noqa: E402
from rmjax.convert.export import export_reward_model  # noqa: E402
from rmjax.data.tokenizer import HFTokenizer  # noqa: E402
from rmjax.score import load_model, score_file  # noqa: E402
from tests.test_convention import LINES, bpe_tokenizer, hf_ids, read_rewards, run_score  # noqa: E402
from tests.test_convert import save_tiny  # noqa: E402


def report(name: str, got, want) -> None:
  d = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  print(f"{name:42s} max|d| {d:.2e}   relative {d / float(np.max(np.abs(want))):.2e}")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/rmjax_convention")
  tmp = pathlib.Path(parser.parse_args().workdir)
  (tmp / "hub").mkdir(parents=True, exist_ok=True)
  folder = tmp / "hub"
  bpe_tokenizer(folder)
  ref = save_tiny("qwen2", folder, classifier=True, vocab_size=320, pad_token_id=0,
                  tie_word_embeddings=False)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  with torch.no_grad():
    want = np.array([ref(input_ids=torch.tensor([hf_ids(tok, x)])).logits[0, 0].item()
                     for x in LINES])
  kinds = ["text" if "text" in x else "messages" if "messages" in x else "prompt/response"
           for x in LINES]
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    for bs in (1, 16):
      got = run_score(folder, LINES, tmp, mesh, bs)
      for kind in ("text", "prompt/response", "messages"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        report(f"hub, batch {bs}, {kind}", got[idx], want[idx])
    model, _ = load_model(str(folder), mesh)
    (tmp / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LINES))
    score_file(model, HFTokenizer(str(folder), "rmjax"), str(tmp / "in.jsonl"),
               str(tmp / "out.jsonl"), batch_size=16, mesh=mesh)
    report("hub with the 'rmjax' convention (contrast)", read_rewards(tmp / "out.jsonl"), want)

    texts = [LINES[0]["text"]] + [x["prompt"] + x["response"] for x in LINES[6:]]
    (tmp / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_tok = HFTokenizer(str(folder), "rmjax")
    score_file(model, run_tok, str(tmp / "texts.jsonl"), str(tmp / "out.jsonl"), batch_size=4,
               mesh=mesh)
    rm = read_rewards(tmp / "out.jsonl")
    export_reward_model(model, tmp / "export", tokenizer=run_tok)
  ex_tok = transformers.AutoTokenizer.from_pretrained(tmp / "export")
  back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp / "export").eval()
  for side in ("right", "left"):
    ex_tok.padding_side = side
    with torch.no_grad():
      report(f"export, {side} padding",
             back(**ex_tok(texts, padding=True, return_tensors="pt")).logits[:, 0].numpy(), rm)
  pipe = transformers.pipeline("text-classification", model=str(tmp / "export"),
                               function_to_apply="none")
  report("export, pipeline", [o["score"] for o in pipe(texts)], rm)
  with torch.no_grad():
    report("export, original tokenizer (contrast)",
           back(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0].numpy(), rm)


if __name__ == "__main__":
  main()
