"""Synthetic data, tokenise-and-pad, and the grain pipeline."""
import re

import numpy as np
import pytest

from configs import synthetic
from rmjax.data.pipeline import FIELDS, encode_pair, encode_sequence, eval_batches, train_dataset
from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer


def check_lines(question, solution):
  """Independent checker: indices of wrong steps (arithmetic or misread operand), final answer."""
  numbers = re.findall(r"[+-]?\d+", question)
  value, wrong = int(numbers[0]), []
  steps = re.findall(r" (\d+)([+-])(\d+)=(\d+)\n", solution)
  for k, ((a, sign, b, c), op) in enumerate(zip(steps, numbers[1:])):
    a, b, c = int(a), int(b), int(c)
    if a != value or f"{sign}{b}" != op or c != (a + b if sign == "+" else a - b):
      wrong.append(k)
    value = c
  answer = int(re.search(r"answer (\d+)\n$", solution).group(1))
  return wrong, answer, value, len(steps) == len(numbers) - 1


@pytest.mark.parametrize("kinds", [("carry",), ("copy",), ("arith",), ("carry", "copy", "arith")])
def test_synthetic_rejected_slips_at_the_recorded_step(kinds):
  src = SyntheticMath(300, split="train", seed=7, error_kinds=kinds)
  for i in range(len(src)):
    ex = src[i]
    q = ex["prompt"].removeprefix("Q: ").removesuffix("\nA:")
    wrong_c, ans_c, last_c, complete_c = check_lines(q, ex["chosen"])
    wrong_r, ans_r, last_r, complete_r = check_lines(q, ex["rejected"])
    assert complete_c and complete_r and wrong_c == [] and ans_c == last_c
    assert wrong_r == [ex["error_step"]] and ex["error_kind"] in kinds
    assert ans_r == last_r != ans_c  # the slip is carried on to a wrong answer
    assert ex["chosen"][:ex["error_char"]] == ex["rejected"][:ex["error_char"]]
    assert ex["chosen"][ex["error_char"]] != ex["rejected"][ex["error_char"]]
    assert all(0 <= int(n) <= 9 for n in re.findall(r"\d+", ex["rejected"]))


def test_synthetic_is_deterministic_and_splits_differ():
  a, b = SyntheticMath(50, "train", seed=1), SyntheticMath(50, "train", seed=1)
  assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
  with pytest.raises(IndexError):
    a[50]


def test_synthetic_splits_share_no_problem():
  d = synthetic.get_config().data  # the demo's problem space; 1/4 of its training pairs
  make = lambda split, n: SyntheticMath(n, split, seed=d.seed, min_steps=d.min_steps,
                                        max_steps=d.max_steps, max_value=d.max_value)
  prompts = {}
  for split, n in (("train", d.train_size // 4), ("validation", d.eval_size), ("test", 256)):
    examples = list(make(split, n))
    prompts[split] = {ex["prompt"] for ex in examples}
    ids = {}  # problem_id: one per problem (prompt), what the by-problem bootstrap groups by
    assert all(ids.setdefault(ex["problem_id"], ex["prompt"]) == ex["prompt"] for ex in examples)
    assert len(ids) == len(prompts[split])
  assert not prompts["train"] & prompts["validation"]
  assert not prompts["train"] & prompts["test"] and not prompts["validation"] & prompts["test"]


def test_encode_pair_masks_and_padding_sides():
  tok = ByteTokenizer()
  ex = {"prompt": "Q: 1+2\nA:", "chosen": " 1+2=3\n", "rejected": " 1+2=4\n", "id": "x"}
  for side in ("right", "left"):
    p = encode_pair(ex, tok, 24, side)
    assert p["tokens"].shape == (2, 24)
    for row, text in ((0, ex["chosen"]), (1, ex["rejected"])):
      real = p["mask"][row].astype(bool)
      assert tok.decode(p["tokens"][row][real]) == ex["prompt"] + text
      assert tok.decode(p["tokens"][row][p["response"][row].astype(bool)]) == text
      assert (p["tokens"][row][~real] == tok.pad_id).all()
      assert real[-1] if side == "left" else real[0]


def test_overlong_prompt_is_cut_from_the_left_and_bad_input_is_named():
  ids, mask, resp = encode_sequence([1, 2, 3, 4, 5], [6, 7], max_len=4, pad_id=0)
  assert ids.tolist() == [4, 5, 6, 7] and resp.tolist() == [0, 0, 1, 1] and mask.all()
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="example e7: field 'rejected': empty response"):
    encode_pair({"prompt": "Q", "chosen": "a", "rejected": "", "id": "e7"}, tok, 8)
  # a response longer than max_len keeps its head and its final (EOS) token; every cut is counted
  p = encode_pair({"prompt": "Q:", "chosen": "abcdefghi", "rejected": "xy", "id": "e8"}, tok, 8)
  assert tok.decode(p["tokens"][0]) == "abcdefgi" and p["response"][0].all()
  assert tok.decode(p["tokens"][1][p["mask"][1] == 1]) == "Q:xy"
  assert p["truncated"].tolist() == [2 + 1, 0]  # the whole 2-token prompt and 1 response token
  p = encode_pair({"prompt": "Q: 123", "chosen": "abcd", "rejected": "xy", "id": "e9"}, tok, 8)
  assert p["truncated"].tolist() == [2, 0] and tok.decode(p["tokens"][0]) == " 123abcd"


def test_train_iterator_resumes_at_the_exact_next_batch():
  src, tok = SyntheticMath(40), ByteTokenizer()
  make = lambda: iter(train_dataset(src, tok, global_batch_size=4, max_len=48, seed=3))
  it = make()
  for _ in range(13):  # past one epoch: reshuffled order
    next(it)
  state = it.get_state()
  want = [next(it)["tokens"] for _ in range(5)]
  fresh = make()
  fresh.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(fresh)["tokens"], w)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_eval_batches_hold_each_example_once_in_order_then_padding_rows(padding_side):
  src, tok = SyntheticMath(10, "validation"), ByteTokenizer()
  want = [encode_pair(src[i], tok, 48, padding_side) for i in range(10)]
  batches = list(eval_batches(src, tok, global_batch_size=4, max_len=48,
                              padding_side=padding_side))
  assert [n for _, n in batches] == [4, 4, 2]
  real = {k: np.concatenate([b[k][:n] for b, n in batches]) for k in FIELDS}
  for k in FIELDS:  # the real rows are examples 0..9, in order, each once
    np.testing.assert_array_equal(real[k], np.stack([p[k] for p in want]), err_msg=k)
  assert len({tok.decode(t[0]) for t in real["tokens"]}) == 10  # ten distinct examples
  last, n = batches[-1]
  for k in FIELDS:  # rows past n_real fill the fixed shape (the final example again)
    assert last[k].shape[0] == 4
    np.testing.assert_array_equal(last[k][n:], np.stack([want[-1][k]] * 2), err_msg=k)


def random_model(config, seed=0):
  """A ``RewardModel`` of ``config`` with N(0, 0.1) weights, built without compiling its init."""
  import jax
  from flax import nnx

  from rmjax import train_state
  from rmjax.models import RewardModel
  rng = np.random.default_rng(seed)
  abstract = nnx.eval_shape(lambda: RewardModel(train_state.model_config(config), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = jax.tree.map(lambda x: jax.numpy.asarray(0.1 * rng.normal(size=x.shape), x.dtype),
                       state)
  return nnx.merge(graphdef, state)


def test_feature_cache_refuses_other_weights_or_data(tmp_path, mesh1):
  from rmjax import cache_features
  from tests.helpers import tiny_config
  config = tiny_config("bt")
  model = random_model(config)
  out = str(tmp_path / "features")
  cache = lambda c: cache_features.cache(c, model, 1, out, ("validation",), limit=8, batch_size=8)
  cache(config)
  top = (tmp_path / "features" / "top_params.npz").read_bytes()
  other = tiny_config("bt")
  other.data.padding_side = "left"
  with pytest.raises(ValueError, match=r"other settings \(data differ\)"):
    cache(other)
  embedding = model.backbone.embed.embedding
  trained = embedding[...]
  embedding[...] = trained.at[3, 0].add(1e-3)  # another checkpoint: one weight differs
  with pytest.raises(ValueError, match=r"other settings \(weights_sha256 differ\)"):
    cache(config)
  assert (tmp_path / "features" / "top_params.npz").read_bytes() == top
  embedding[...] = trained
  cache(config)  # the same model and data resume
