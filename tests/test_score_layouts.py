"""rmjax.score --layout=shared_prompt (best-of-N lines packed as [prompt | r1 | r2 | ...]) gives
each line the reward of scoring it alone, under both conventions; a changed response moves only
its own reward."""
import json

import jax
import numpy as np
import pytest

from rmjax import sharding, train_state
from rmjax.data.tokenizer import ByteTokenizer, HFTokenizer
from rmjax.score import pack_rows, prompt_key, score_file
from tests.helpers import tiny_config

MAX_LEN = 64
PROMPTS = ["Q: what is 2+3? A:", "Natalia sold ", "hello world, this is", "Q: what "]
RESPONSES = [" 5.", "is 2+3?", " to her friends", "clips to 48 of her friends in April.",
             " the answer is five", "\n6"]
LINES = ([{"prompt": p, "response": r} for p in PROMPTS for r in RESPONSES]
         + [{"text": "hello world"}, {"prompt": "a lone prompt", "response": " and its answer"},
            {"prompt": "long " * 20, "response": " cut from the left"},  # truncated
            {"prompt": "Q: what ", "response": "x" * 70},  # its own response cut in the middle
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello there"}]}])


def score(model, tokenizer, lines, tmp_path, layout, batch_size=16) -> list[dict]:
  """Few batches, so few shapes to compile: the test stays quick."""
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  score_file(model, tokenizer, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
             batch_size=batch_size, max_len=MAX_LEN, layout=layout)
  return [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]


def alone(model, ids_per_line: list[list[int]]) -> np.ndarray:
  """Reference: each line on its own in a batch of one, right-padded to MAX_LEN, by the plain
  forward pass (no parts, reward at the last real token)."""
  forward = jax.jit(lambda tokens, mask: model(tokens, mask)[0])
  out = []
  for ids in ids_per_line:
    assert len(ids) <= MAX_LEN
    tokens, mask = np.zeros((1, MAX_LEN), np.int32), np.zeros((1, MAX_LEN), np.int32)
    tokens[0, :len(ids)], mask[0, :len(ids)] = ids, 1
    out.append(float(forward(tokens, mask)[0]))
  return np.asarray(out)


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def rmjax_model():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    model, _ = train_state.merge(*train_state.create_state(tiny_config(), mesh))
  return model, mesh


def byte_ids(line, max_len=MAX_LEN) -> list[int]:
  """The line's bytes, cut as rmjax cuts (prompt's left end, then the response's middle)."""
  tok = ByteTokenizer()
  if "messages" in line:
    m = line["messages"]
    p = "".join(f"{t['role']}: {t['content']}\n" for t in m[:-1]) + "assistant:"
    p, r = tok.encode(p), tok.encode(" " + m[-1]["content"])
  else:
    p, r = tok.encode(line.get("prompt", "")), tok.encode(line.get("text") or line["response"])
  if len(r) > max_len:
    return r[:max_len - 1] + r[-1:]
  return (p + r)[-max_len:]


def test_packing_shares_each_prompt_once():
  tok = ByteTokenizer()
  seqs = [byte_ids(x) for x in LINES]
  keys = [prompt_key(x) for x in LINES]
  rows = pack_rows(seqs, keys, MAX_LEN, "shared_prompt")
  assert sorted(i for row in rows for i, _ in row.reads) == list(range(len(LINES)))
  assert len(rows) < len(LINES) and sum(len(r.ids) for r in rows) < sum(map(len, seqs))
  for row in rows:
    assert len(row.ids) <= MAX_LEN
    for k, (i, end) in enumerate(row.reads):  # the line's tokens, read in row order, spell it
      where = [j for j, part in enumerate(row.parts) if part in (0, k + 1)]
      assert [row.ids[j] for j in where] == seqs[i] and where[-1] == end
    if len(row.reads) > 1:  # a shared row holds lines of one prompt, which it writes once
      assert len({keys[i] for i, _ in row.reads}) == 1
      n_shared = row.parts.count(0)
      assert n_shared >= len(tok.encode(LINES[row.reads[0][0]].get("prompt", "")))
  assert max(len(r.reads) for r in rows) >= 3
  with pytest.raises(ValueError, match="--layout='rows'"):
    score_file(None, tok, "unused.jsonl", "unused_out.jsonl", layout="rows")


@pytest.mark.parametrize("layout", ["shared_prompt", "sequences"])
def test_rmjax_convention_rewards_equal_scoring_each_line_alone(rmjax_model, tmp_path, layout):
  model, mesh = rmjax_model
  with sharding.use_mesh(mesh):
    out = score(model, ByteTokenizer(), LINES, tmp_path, layout)
    want = alone(model, [byte_ids(x) for x in LINES])
  assert [{k: v for k, v in o.items() if k not in ("reward", "truncated")} for o in out] == LINES
  assert out[-4]["truncated"] == len(("long " * 20 + " cut from the left").encode()) - MAX_LEN
  assert out[-3]["truncated"] == 8 + 70 - MAX_LEN and "truncated" not in out[0]
  assert rel_err([o["reward"] for o in out], want) < 1e-5


def test_a_changed_response_moves_only_its_own_reward(rmjax_model, tmp_path):
  """Same lengths, so the packing is the same: the left (shortest) and the right (longest)
  response of a shared row each change; every other reward stays."""
  model, mesh = rmjax_model
  lines = [x for x in LINES if x.get("prompt") == PROMPTS[1]]
  first = min(range(len(lines)), key=lambda i: len(lines[i]["response"]))
  last = max(range(len(lines)), key=lambda i: len(lines[i]["response"]))
  with sharding.use_mesh(mesh):
    base = np.array([o["reward"] for o in score(model, ByteTokenizer(), lines, tmp_path,
                                                 "shared_prompt", batch_size=8)])
    for i in (first, last):
      changed = [dict(x) for x in lines]
      changed[i]["response"] = changed[i]["response"][:-2] + "?!"
      got = np.array([o["reward"] for o in score(model, ByteTokenizer(), changed, tmp_path,
                                                  "shared_prompt", batch_size=8)])
      others = np.arange(len(lines)) != i
      np.testing.assert_allclose(got[others], base[others], rtol=1e-6)
      assert abs(got[i] - base[i]) > 1e-3 * np.max(np.abs(base))


@pytest.mark.slow  # over a minute on 2 cores: -m slow
def test_hf_convention_rewards_equal_scoring_each_line_alone(tmp_path):
  """A BPE whose merges cross the prompt/response boundary: only the common token prefix of a
  row's joint encodings is shared."""
  pytest.importorskip("torch", reason="the tiny HF classifier is built with transformers")
  from rmjax.score import load_model
  from tests.test_convention import bpe_tokenizer, hf_ids
  from tests.test_convert import save_tiny
  folder = tmp_path / "hub"
  bpe_tokenizer(folder)
  save_tiny("qwen2", folder, classifier=True, std=0.1, vocab_size=320, pad_token_id=0,
            tie_word_embeddings=False)
  lines = [x for x in LINES
           if len(x.get("response", "")) < 40 and "long" not in x.get("prompt", "")]
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    model, tokenizer = load_model(str(folder), mesh)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.convention == "hf"
    ids = [hf_ids(tokenizer.hf, x) for x in lines]
    assert max(map(len, ids)) <= MAX_LEN
    # the boundary merges: some prompt's lines differ inside its own encoding
    assert any(i[:len(tokenizer.hf(x["prompt"]).input_ids)] != tokenizer.hf(x["prompt"]).input_ids
               for i, x in zip(ids, lines) if "prompt" in x)
    want = alone(model, ids)
    for layout in ("shared_prompt", "sequences"):
      got = [o["reward"] for o in score(model, tokenizer, lines, tmp_path, layout)]
      assert rel_err(got, want) < 1e-5, layout
