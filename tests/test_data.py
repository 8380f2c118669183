"""Synthetic data, tokenise-and-pad, and the grain pipeline."""
import re

import numpy as np
import pytest

from rmjax.data.pipeline import encode_pair, encode_sequence, eval_batches, train_dataset
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
  val = SyntheticMath(50, "validation", seed=1)
  assert len({a[i]["prompt"] for i in range(50)} & {val[i]["prompt"] for i in range(50)}) < 5
  with pytest.raises(IndexError):
    a[50]


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


def test_eval_batches_cover_each_example_once():
  src, tok = SyntheticMath(10, "validation"), ByteTokenizer()
  got = [(b["tokens"].shape[0], n) for b, n in eval_batches(src, tok, global_batch_size=4,
                                                            max_len=48)]
  assert got == [(4, 4), (4, 4), (4, 2)]
