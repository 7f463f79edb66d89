"""Structured output (router/structured.py): greedy outputs held to a JSON Schema, a regex, a choice list, a grammar
and a structural tag (a tool call in Qwen3's format) equal HF generate's under the same constraint (prefix_allowed_tokens_fn) on all three architectures, eager and padded;
each output belongs to its language; bad specs and combinations are refused by field."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams
from moeserve.router.errors import InvalidRequestError
from moeserve.router.sampler import Sampler
from moeserve.router.structured import Grammars, StructuredOutput, apply_grammar

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "color", "n"], "additionalProperties": False}
CHOICES = ("yes", "no", 'say "maybe"')
# A call of a function "pick" in Qwen3's tool-call format, as the HTTP front's tool_choice naming it asks for.
CALL = xgr.get_model_structural_tag("qwen_3", tools=[{"type": "function", "function": {"name": "pick", "parameters": SCHEMA}}],
                                    tool_choice={"type": "function", "function": {"name": "pick"}},
                                    reasoning="disabled", max_whitespace_cnt=1).model_dump_json()
SPECS = [StructuredOutput("json_schema", json.dumps(SCHEMA)), StructuredOutput("regex", r"[a-z]{2,6}@(x|y)\.com"),
         StructuredOutput("choice", choices=CHOICES), StructuredOutput("grammar", 'root ::= "(" [0-9] [0-9]? ")" [a-c]'),
         StructuredOutput("structural_tag", CALL)]
MAX_TOKENS = 128  # (a complete output ends long before: the call is the longest)
ARCHS = {"deepseek_v3": 0, "qwen3_moe": 0, "mixtral": 3}


def _fits(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"ok", "color", "n"} and isinstance(value["ok"], bool)
            and value["color"] in ("red", "green", "blue") and isinstance(value["n"], int) and 0 <= value["n"] <= 99)


def belongs(so: StructuredOutput, text: str) -> bool:
    """Whether `text` is in the language of `so` (checked without xgrammar)."""
    if so.kind == "json_schema":
        return _fits(json.loads(text))
    if so.kind == "structural_tag":
        m = re.fullmatch(r'<tool_call>\n\{"name": "pick", "arguments": (.*)\}\n</tool_call>', text, re.DOTALL)
        return m is not None and _fits(json.loads(m[1]))
    if so.kind == "regex":
        return re.fullmatch(so.spec, text) is not None
    if so.kind == "choice":
        return text in so.choices
    return re.fullmatch(r"\([0-9][0-9]?\)[a-c]", text) is not None


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, hf_checkpoint, tmp_path_factory):
    """A tiny checkpoint of the architecture with the demo model's byte-level BPE tokenizer (512 tokens)."""
    from moeserve.models.demo_tokenizer import EOS, train_demo_tokenizer

    tok = train_demo_tokenizer()
    src = hf_checkpoint(request.param, seed=ARCHS[request.param], vocab_size=tok.get_vocab_size(),
                        eos_token_id=tok.token_to_id(EOS))
    path = tmp_path_factory.mktemp(f"{request.param}-tok") / "ckpt"
    shutil.copytree(src, path)
    tok.save(str(path / "tokenizer.json"))
    return path


def _hf_constrained(path, prompts: list[list[int]], specs: list[StructuredOutput]) -> list[list[int]]:
    """HF generate (greedy) with each prompt's tokens restricted, step by step, to what an xgrammar matcher of its spec
    allows next: the reference for the engine's masking."""
    from transformers import AutoModelForCausalLM

    from moeserve.models.tokenizer import load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tok = load_tokenizer(path)
    vocab = hf.config.vocab_size
    grammars = Grammars(tok, vocab, tok.eos_token_ids)
    out = []
    for prompt, so in zip(prompts, specs):
        matcher, fed = grammars.matcher(so), [0]
        bitmask = xgr.allocate_token_bitmask(1, vocab)

        def allowed(batch_id, input_ids, matcher=matcher, fed=fed, bitmask=bitmask, prompt=prompt):
            new = input_ids[len(prompt):].tolist()
            for t in new[fed[0]:]:
                assert matcher.accept_token(t)
            fed[0] = len(new)
            matcher.fill_next_token_bitmask(bitmask, 0)
            words = bitmask[0].tolist()
            return [i for i in range(vocab) if (words[i // 32] >> (i % 32)) & 1]

        with torch.no_grad():
            seq = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                              prefix_allowed_tokens_fn=allowed, eos_token_id=tok.eos_token_ids, pad_token_id=0)
        out.append(seq[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_structured_outputs_equal_hf_constrained_generate(checkpoint, mode):
    engine = LLMEngine.from_config(EngineConfig(model=str(checkpoint), num_kv_blocks=64, block_size=8,
                                                decode_graphs=mode))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (3, 9, 17, 5, 11)]
    outs = engine.generate_batch(prompts + [prompts[0]], [SamplingParams(max_tokens=MAX_TOKENS, structured_output=so)
                                                          for so in SPECS] + [SamplingParams(max_tokens=8)])
    want = _hf_constrained(checkpoint, prompts, SPECS)
    for so, w, out in zip(SPECS, want, outs):
        assert out.new_token_ids == w, f"{so.kind}: differs from HF generate under the same constraint"
        assert out.finish_reason == "eos", f"{so.kind}: {out.new_text!r} did not complete"
        assert belongs(so, out.new_text), f"{so.kind}: {out.new_text!r}"
    assert not belongs(SPECS[2], outs[-1].new_text)  # the unconstrained companion is not held to anything


def test_a_resumed_structured_request_goes_on_as_it_would_have(demo_model_dir):
    """A trunk worker's resubmission: the tokens already streamed are fed to the new matcher first."""
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64, block_size=8))
    prompt = engine.tokenizer.encode("Hello, my name is")
    params = SamplingParams(max_tokens=MAX_TOKENS, structured_output=SPECS[0], temperature=0.8, seed=5)
    (whole,) = engine.generate_batch([prompt], params)
    assert belongs(SPECS[0], whole.new_text)
    engine.add_request("again", prompt, params, resume=whole.new_token_ids[:6])
    rest = []
    while engine.has_unfinished():
        rest += [t for out in engine.step() for t in out.new_token_ids]
    assert whole.new_token_ids[:6] + rest == whole.new_token_ids
    with pytest.raises(InvalidRequestError, match="resume: the tokens do not follow"):
        engine.add_request("bad", prompt, params, resume=engine.tokenizer.encode("nope"))


def test_the_mask_leaves_other_rows_and_the_raw_logits_alone(demo_model_dir):
    from moeserve.models.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_model_dir)
    grammars = Grammars(tok, 512, tok.eos_token_ids)
    logits = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    masked = apply_grammar(logits, [None, grammars.matcher(SPECS[2]), None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]) in ("y", "ye", "yes", "n", "no", "s", "sa", "say") or
                           any(c.startswith(tok.decode([t])) for c in CHOICES) for t in allowed)
    assert apply_grammar(logits, [None, None, None]) is logits
    params = [SamplingParams(max_tokens=4)] * 3
    assert Sampler()(logits, params, [None] * 3, None, [None, grammars.matcher(SPECS[2]), None])[1] in allowed


@pytest.mark.parametrize("kw, field, words", [
    (lambda: dict(structured_output=StructuredOutput("json_schema", '{"type": "object"')),
     "structured_output.json_schema", "is not JSON"),
    (lambda: dict(structured_output=StructuredOutput("regex", "[a-")), "structured_output.regex", "does not compile"),
    (lambda: dict(structured_output=StructuredOutput("grammar", "root ::= missing_rule")), "structured_output.grammar",
     "does not compile"),
    (lambda: dict(structured_output=StructuredOutput("json_object"), ignore_eos=True), "ignore_eos", "structured_output"),
    (lambda: dict(structured_output=StructuredOutput("json_object"), min_tokens=2), "min_tokens", "structured_output"),
    (lambda: dict(structured_output=StructuredOutput("choice", choices=())), "structured_output.choice", "1..256"),
    (lambda: dict(structured_output=StructuredOutput("regex", "")), "structured_output.regex", "empty"),
    (lambda: dict(structured_output=StructuredOutput("xml")), "structured_output", "kind must be one of"),
    (lambda: dict(structured_output=StructuredOutput("structural_tag", "[]")), "structured_output.structural_tag",
     "must be a structural tag"),
    (lambda: dict(structured_output=StructuredOutput("structural_tag", '{"type": "structural_tag", "format": '
                                                                       '{"type": "nope"}}')),
     "structured_output.structural_tag", "does not compile"),
])
def test_bad_structured_outputs_are_named(demo_model_dir, kw, field, words):
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), num_kv_blocks=16, block_size=8))
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=8, **kw()))
    assert err.value.field == field and words in str(err.value)
    assert not engine.has_unfinished()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_structured_outputs_on_gpu(demo_model_dir):
    """On a GPU (decode graphs, look-ahead for the row that allows it, the bitmask uploaded to the device): the
    tokens of the eager engine without look-ahead (float32)."""
    def engine(**kw):
        return LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), device="cuda", dtype="float32",
                                                  num_kv_blocks=64, block_size=8, prefill_hold_ms=0, **kw))

    eager = engine(overlap_decode=False, decode_graphs="off", prefix_caching=False)
    prompts = [eager.tokenizer.encode(t) for t in ("Answer:", "Mail to", "Yes or no?", "Code", "Call it", "Once upon a time")]
    params = [SamplingParams(max_tokens=MAX_TOKENS, structured_output=so) for so in SPECS]
    params.append(SamplingParams(max_tokens=24, ignore_eos=True))
    want = eager.generate_batch(prompts, params)
    got = engine(overlap_decode=True, decode_graphs="auto").generate_batch(prompts, params)
    assert [o.new_token_ids for o in got] == [o.new_token_ids for o in want]
    for so, out in zip(SPECS, got):
        assert out.finish_reason == "eos" and belongs(so, out.new_text), (so.kind, out.new_text)


def test_a_stop_token_only_the_tokenizer_names_ends_the_output(hf_checkpoint, tmp_path):
    """A checkpoint whose config names no end-of-sequence (only tokenizer_config.json does): the grammar still ends
    the output on the tokenizer's, and the engine ends the request there ("stop")."""
    from moeserve.models.demo_tokenizer import EOS, train_demo_tokenizer

    tok = train_demo_tokenizer()
    path = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint("qwen3_moe", seed=0, vocab_size=tok.get_vocab_size()), path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    engine = LLMEngine.from_config(EngineConfig(model=str(path), num_kv_blocks=16, block_size=8))
    assert not engine.eos_token_ids and engine.tokenizer.eos_token_ids == [tok.token_to_id(EOS)]
    (out,) = engine.generate_batch([[5, 6, 7]], SamplingParams(max_tokens=20, structured_output=SPECS[2]))
    assert out.finish_reason == "stop" and out.new_text in CHOICES
    assert out.new_token_ids[-1] == tok.token_to_id(EOS) and not engine.has_unfinished()


def test_specs_compile_from_several_threads_at_once(demo_model_dir):
    """Grammars holds no lock (LLMEngine.prepare compiles on threads beside the engine): distinct specs compiled and
    matched concurrently each accept their own output and refuse another's."""
    from concurrent.futures import ThreadPoolExecutor

    from moeserve.models.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_model_dir)
    grammars = Grammars(tok, 512, tok.eos_token_ids)

    def schema(i):
        return {"type": "object", "properties": {f"f{j}": {"enum": [f"v{i}-{j}-{k}" for k in range(4)]}
                                                 for j in range(8)}, "required": [f"f{j}" for j in range(8)]}

    specs = [StructuredOutput("json_schema", json.dumps(schema(i))) for i in range(40)]

    def check(k):
        own = json.dumps({f"f{j}": f"v{k % 40}-{j}-1" for j in range(8)})
        other = own.replace(f"v{k % 40}-", f"v{(k + 1) % 40}-", 1)
        mine, theirs = grammars.matcher(specs[k % 40]), grammars.matcher(specs[k % 40])
        return all(mine.accept_token(t) for t in tok.encode(own)) and \
            not all(theirs.accept_token(t) for t in tok.encode(other))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(160)))
