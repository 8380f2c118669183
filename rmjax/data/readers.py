"""Raw source files -> example dicts, with errors that name ``path:line``.

Each reader returns ``(examples, summary)``: plain dicts of str/int/float fields, and a Counter of
the pairs it skipped and why (``"skipped: identical chosen/rejected"``, ``"skipped: duplicate
pair"``, ...) plus notes on kept ones (``"kept: ..."``). A bad
record (malformed JSON, missing or empty field, bytes that are not UTF-8) raises
``ValueError("path:line: what is wrong")``; nothing is silently dropped. Pairs of data with a
natural group (problem, dialogue, question) carry it as an int ``problem_id``, which the
by-problem bootstrap resamples.

Text conventions (see docs/data.md):
* GSM8K: the ``<<a*b=c>>`` calculator notes are stripped (models write plain text) and the final
  ``#### n`` line of reference solutions becomes ``A: n``, the model solutions' format. Prompt =
  question + newline, response = solution.
* HH-RLHF: prompt = the dialogue both sides share, up to and including its last
  ``\\n\\nAssistant:``; responses are the rest (the final assistant turns).
* Fine-grained QA: prompt = the retrieved passages, then ``Question: ...\\nAnswer:`` (the question
  last, so a left-cut over-long prompt loses passages first); response = " " + answer.
"""
from __future__ import annotations

import collections
import gzip
import json
import os
import re

import numpy as np

from rmjax.data.tokenizer import check_messages

SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
CALC_NOTE = re.compile(r"<<([^<>]*)>>")
ASSISTANT = "\n\nAssistant:"
GSM8K_MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
FGQA_PAIRS = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))
WHITESPACE = re.compile(r"\s*")


# --- file access ---

def _text(path: str) -> str:
  """The file's text; bytes that are not UTF-8 raise an error naming the line."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}:{line}: bytes are not valid UTF-8 "
                     f"({data[e.start:e.start + 1]!r} at byte {e.start})") from None


def iter_jsonl(path: str):
  """``(lineno, object)`` for every non-blank line of a ``.jsonl`` (or ``.jsonl.gz``) file."""
  for lineno, line in enumerate(_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    yield lineno, record


def iter_json_array(path: str):
  """``(lineno, object)`` for the items of a file holding one JSON array (lineno: item start)."""
  text, decoder = _text(path), json.JSONDecoder()
  skip = lambda pos: WHITESPACE.match(text, pos).end()
  pos = skip(0)
  if not text.startswith("[", pos):
    raise ValueError(f"{path}:1: expected a JSON array of objects")
  pos = skip(pos + 1)
  while not text.startswith("]", pos):
    lineno = text.count("\n", 0, pos) + 1
    try:
      record, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    yield lineno, record
    pos = skip(pos)
    if text.startswith(",", pos):
      pos = skip(pos + 1)
    elif not text.startswith("]", pos):
      line = text.count("\n", 0, pos) + 1
      raise ValueError(f"{path}:{line}: malformed JSON (expected ',' or ']' after an item)")


def field(record: dict, name: str, where: str, kind=str):
  """``record[name]``, checked: present, of type ``kind``, and (for text) not blank."""
  if name not in record:
    raise ValueError(f"{where}: field {name!r} is missing")
  value = record[name]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    raise ValueError(f"{where}: field {name!r} should be {getattr(kind, '__name__', kind)}, "
                     f"got {type(value).__name__}")
  if isinstance(value, str) and not value.strip():
    raise ValueError(f"{where}: field {name!r} is empty")
  return value


def keep_pair(example: dict, seen: set, summary: collections.Counter) -> bool:
  """False (and counted) for identical chosen/rejected or a pair already seen."""
  key = (example["prompt"], example["chosen"], example["rejected"],
         example.get("chosen_messages", ""), example.get("rejected_messages", ""))
  if key[1] == key[2] and key[3] == key[4]:
    summary["skipped: identical chosen/rejected"] += 1
    return False
  if key in seen:
    summary["skipped: duplicate pair"] += 1
    return False
  seen.add(key)
  return True


def split_groups(groups, seed: int, first=()) -> dict[str, str]:
  """Group id -> split, by a seeded permutation of the sorted ids (SPLIT_FRACTIONS). With
  ``first``, its groups are split among themselves (as ``split_groups(first)`` splits them) and
  the other groups among themselves: configs of one dataset that keep different subsets of its
  groups (problems with a pair, or every problem) then share one split."""
  bounds = _split_ids(list(first), seed)
  return {**bounds, **_split_ids([g for g in groups if str(g) not in bounds], seed)}


def _split_ids(groups, seed: int) -> dict[str, str]:
  order = np.random.default_rng(seed).permutation(sorted(set(groups)))
  n, bounds, start = len(order), {}, 0
  for i, (split, frac) in enumerate(SPLIT_FRACTIONS.items()):
    end = n if i == len(SPLIT_FRACTIONS) - 1 else start + round(frac * n)
    bounds.update({str(g): split for g in order[start:end]})
    start = end
  return bounds


# --- GSM8K ---

def strip_notes(text: str) -> str:
  return CALC_NOTE.sub("", text)


def gsm8k_solutions(path: str):
  """Every labelled model solution, and every (correct, incorrect) pair of one problem.

  Returns ``(solutions, pairs, summary)``; ``problem_id`` is the problem's line number - 1.
  """
  solutions, pairs, seen, summary = [], [], set(), collections.Counter()
  for lineno, rec in iter_jsonl(path):
    where = f"{path}:{lineno}"
    prompt = field(rec, "question", where).strip() + "\n"
    problem = lineno - 1
    mine = []
    for model in GSM8K_MODELS:
      sol = field(rec, model, where, dict)
      correct = field(sol, "is_correct", f"{where}: {model}", bool)
      text = strip_notes(field(sol, "solution", f"{where}: {model}")).strip()
      mine.append({"id": f"{problem}-{model}", "problem_id": problem, "prompt": prompt,
                   "response": text, "is_correct": correct, "model": model})
    solutions += mine
    for good in (s for s in mine if s["is_correct"]):
      for bad in (s for s in mine if not s["is_correct"]):
        pair = {"id": f"{good['id']}>{bad['model']}", "problem_id": problem, "prompt": prompt,
                "chosen": good["response"], "rejected": bad["response"],
                "chosen_model": good["model"], "rejected_model": bad["model"]}
        if keep_pair(pair, seen, summary):
          pairs.append(pair)
  return solutions, pairs, summary


def perturb(answer: str, rng: np.random.Generator):
  """Reference solution -> (chosen, rejected, error_step, error_char) or None.

  One calculation result (a number written right after a ``<<expr=result>>`` note) gets one
  digit changed; everything before it is untouched, later steps are left as written.
  """
  lines = answer.strip().splitlines()
  final = re.fullmatch(r"####\s*(.+)", lines[-1].strip()) if lines else None
  if final is None:
    return None
  body = "\n".join(lines[:-1])
  candidates, plain, last = [], [], 0  # (step, offset of the result in the stripped text, result)
  for step, m in enumerate(CALC_NOTE.finditer(body)):
    plain.append(body[last:m.start()])
    last = m.end()
    result = m.group(1).rpartition("=")[2].strip()
    offset = sum(map(len, plain))
    if re.fullmatch(r"-?\d+(\.\d+)?", result) and body.startswith(result, m.end()):
      candidates.append((step, offset, result))
  plain.append(body[last:])
  chosen = "".join(plain) + f"\nA: {final.group(1).strip()}"
  if not candidates:
    return None
  step, offset, result = candidates[rng.integers(len(candidates))]
  digits = [i for i, c in enumerate(result) if c.isdigit() and not (i == 0 and len(result) > 1)
            and not (i == 1 and result[0] == "-" and len(result) > 2)]
  i = digits[rng.integers(len(digits))]
  new = rng.choice([d for d in "0123456789" if d != result[i] and not (d == "0" and i == 0)])
  rejected = chosen[:offset + i] + new + chosen[offset + i + 1:]
  return chosen, rejected, step, offset + i


def gsm8k_perturbed(path: str, seed: int = 0):
  """Reference solution vs the same with one calculation result changed; ``(pairs, summary)``."""
  pairs, seen, summary = [], set(), collections.Counter()
  for lineno, rec in iter_jsonl(path):
    where = f"{path}:{lineno}"
    question, answer = field(rec, "question", where), field(rec, "answer", where)
    out = perturb(answer, np.random.default_rng([seed, lineno]))
    if out is None:
      summary["skipped: no calculation result to perturb"] += 1
      continue
    chosen, rejected, step, char = out
    pair = {"id": str(lineno - 1), "problem_id": lineno - 1, "prompt": question.strip() + "\n",
            "chosen": chosen, "rejected": rejected, "error_step": step, "error_char": char}
    if keep_pair(pair, seen, summary):
      pairs.append(pair)
  return pairs, summary


# --- HH-RLHF ---

def split_dialogue(chosen: str, rejected: str):
  """(prompt, chosen_response, rejected_response): the prompt is the shared prefix up to and
  including its last ``\\n\\nAssistant:``, so no shared text is ever response; None if none."""
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(ASSISTANT)
  if cut < 0:
    return None
  cut += len(ASSISTANT)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def hh_rlhf(path: str):
  """Anthropic HH-RLHF pairs -> ``{id, problem_id, prompt, chosen, rejected}``; ``(pairs,
  summary)``. ``problem_id`` numbers the distinct prompts (dialogues) in order of appearance."""
  pairs, seen, summary, dialogues = [], set(), collections.Counter(), {}
  for lineno, rec in iter_jsonl(path):
    where = f"{path}:{lineno}"
    split = split_dialogue(field(rec, "chosen", where), field(rec, "rejected", where))
    if split is None:
      raise ValueError(f"{where}: chosen and rejected share no dialogue prefix ending in "
                       f"{ASSISTANT!r}")
    prompt, chosen, rejected = split
    if not chosen.strip() or not rejected.strip():
      summary["skipped: empty final response"] += 1
      continue
    if ASSISTANT in chosen or ASSISTANT in rejected:
      summary["kept: a response of several turns"] += 1
    pair = {"id": str(lineno - 1), "prompt": prompt, "chosen": chosen, "rejected": rejected}
    if keep_pair(pair, seen, summary):
      pairs.append({**pair, "problem_id": dialogues.setdefault(prompt, len(dialogues))})
  return pairs, summary


# --- fine-grained QA ---

def qa_prompt(question: str, passages, where: str) -> str:
  """Passages (``[title, sentence, ...]`` lists) first, then the question."""
  if not isinstance(passages, list) or not all(
      isinstance(p, list) and p and all(isinstance(s, str) for s in p) for p in passages):
    raise ValueError(f"{where}: field 'passages' should be a list of [title, sentence, ...] lists")
  context = "".join(f"Passage ({p[0]}): {' '.join(p[1:])}\n\n" for p in passages)
  return f"{context}Question: {question.strip()}\nAnswer:"


def finegrained_qa(path: str, keep_ties: bool = False):
  """Pairs from the 6 judgements per question; ``label`` 1.0 (chosen preferred) or, with
  ``keep_ties``, 0.5 (a tie: chosen/rejected are then just the first/second answer).
  ``question_id`` (= ``problem_id``) is the question's index in the file."""
  pairs, seen, summary = [], set(), collections.Counter()
  for question_id, (lineno, rec) in enumerate(iter_json_array(path)):
    where = f"{path}:{lineno}"
    prompt = qa_prompt(field(rec, "question", where), field(rec, "passages", where, list), where)
    answers = {k: " " + field(rec, f"prediction {k}", where).strip() for k in range(1, 5)}
    prefs = field(rec, "preference", where, list)
    if len(prefs) != 6 or any(p not in (0, 1, 2) or isinstance(p, bool) for p in prefs):
      raise ValueError(f"{where}: field 'preference' should be 6 judgements in {{0, 1, 2}}")
    for (a, b), pref in zip(FGQA_PAIRS, prefs):
      if pref == 0 and not keep_ties:
        summary["skipped: tie"] += 1
        continue
      first, second = (a, b) if pref != 2 else (b, a)
      pair = {"id": f"{question_id}-{a}v{b}", "question_id": question_id,
              "problem_id": question_id, "prompt": prompt,
              "chosen": answers[first], "rejected": answers[second],
              "label": 0.5 if pref == 0 else 1.0}
      if keep_pair(pair, seen, summary):
        pairs.append(pair)
  return pairs, summary


# --- user files ---

def preference_jsonl(path: str):
  """``{"prompt", "chosen", "rejected"[, "margin", "id", "problem_id"]}`` lines, or chat pairs
  ``{"chosen": [messages], "rejected": [messages]}`` (optionally ``"prompt": [messages]`` shared
  before both, the TRL conversational format; the same optional fields); ``(pairs, summary)``.

  ``id`` (a string or an int, unique in the file; default: the line's index, line number - 1)
  names the line on its row, whatever order the rows are read back in. ``problem_id`` (an int;
  default: the line's index, a pair of its own) groups pairs for the by-problem bootstrap."""
  pairs, seen, summary, line_of = [], set(), collections.Counter(), {}
  for lineno, rec in iter_jsonl(path):
    where = f"{path}:{lineno}"
    margin = rec.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
      raise ValueError(f"{where}: field 'margin' should be a number")
    pid = field(rec, "problem_id", where, int) if "problem_id" in rec else lineno - 1
    pair_id = rec.get("id", lineno - 1)
    if not isinstance(pair_id, (str, int)) or isinstance(pair_id, bool):
      raise ValueError(f"{where}: field 'id' should be a string or an int, got "
                       f"{type(pair_id).__name__}")
    if str(pair_id) in line_of:
      raise ValueError(f"{where}: id {str(pair_id)!r} is already the id of line "
                       f"{line_of[str(pair_id)]}")
    line_of[str(pair_id)] = lineno
    pair = {"id": str(pair_id), "problem_id": pid, "margin": float(margin)}
    if isinstance(rec.get("chosen"), list):
      before = rec.get("prompt", [])
      if not isinstance(before, list):
        raise ValueError(f"{where}: field 'prompt' should be a list of messages when 'chosen' is "
                         f"one (chat format), got {type(before).__name__}")
      for side in ("chosen", "rejected"):
        messages = before + field(rec, side, where, list)
        try:
          check_messages(messages)
        except ValueError as e:
          raise ValueError(f"{where}: field {side!r}: {e}") from None
        pair[side] = messages[-1]["content"]
        pair[f"{side}_messages"] = json.dumps(messages, ensure_ascii=False)
      pair["prompt"] = ""
    else:
      pair.update(prompt=field(rec, "prompt", where), chosen=field(rec, "chosen", where),
                  rejected=field(rec, "rejected", where), chosen_messages="",
                  rejected_messages="")
    if keep_pair(pair, seen, summary):
      pairs.append(pair)
  return pairs, summary
