"""Generation with megatron-core's KV cache, sampling filters, perplexity against transformers,
the command-line tools, and the ReAct prompt/parser."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_qwen.config import ModelConfig, ParallelConfig
from megatron_qwen.inference.generation import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    generate,
)
from megatron_qwen.inference.loading import LongContext, set_long_context
from megatron_qwen.inference.react import (
    ReActParseError,
    Tool,
    build_react_prompt,
    parse_react,
    react_loop,
    run_tool,
)
from megatron_qwen.model import build_model
from tests.scripts.model_common import full_mcore_state, hf_reference, load_into_chunks

DATA = Path(__file__).parent / "data" / "multilingual.jsonl"


@pytest.fixture(scope="module")
def hf(tiny):
    return hf_reference(tiny, seed=0)


@pytest.fixture(scope="module")
def model(world, tiny, hf):
    (m,) = build_model(tiny, ParallelConfig())
    load_into_chunks([m], full_mcore_state(hf, tiny, 1), tiny, ParallelConfig())
    return m.eval()


# --------------------------------------------------------------------------- sampling


def test_sampling_filters_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # probabilities 0.644, 0.237, 0.087, 0.032: top-p 0.7 keeps two, 0.6 keeps one
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.6)).tolist() == [[False, True, True, True]]
    penalised = apply_repetition_penalty(logits, torch.tensor([[0, 3]]), 2.0)
    assert penalised.tolist() == [[1.0, 1.0, 0.0, -2.0]]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0).validate()


LOGITS = [3.0, 2.6, 2.2, 1.5, 1.0, 0.4, -0.3, -1.0]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0),  # temperature alone
    (1.0, 3, 1.0), (1.0, 0, 0.75), (0.7, 5, 0.8),  # top-k, top-p, all three
])
def test_sampled_tokens_follow_the_filtered_distribution(temperature, top_k, top_p):
    """20,000 draws of choose_next (what generate samples with) from one logits row, against
    the distribution written out from the definitions (tests/sampling_stats.py)."""
    from megatron_qwen.inference.generation import choose_next
    from tests.sampling_stats import assert_sampled_from, filtered_probs

    n = 20_000
    logits = torch.tensor([LOGITS]).expand(n, -1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    drawn = choose_next(logits, torch.zeros(n, 0, dtype=torch.long), params,
                        torch.Generator().manual_seed(11))
    want = filtered_probs(LOGITS, temperature, top_k, top_p)
    assert_sampled_from(drawn.numpy(), want)
    if (temperature, top_k, top_p) != (1.0, 0, 1.0):  # the setting makes a difference
        assert abs(want - filtered_probs(LOGITS)).max() > 0.05


# --------------------------------------------------------------------------- the KV cache


def test_greedy_with_kv_cache_equals_without_and_transformers(model, tiny, hf):
    """Two prompts of different lengths, greedy: the cached run (megatron-core's
    StaticInferenceContext) equals the full-recompute run and transformers' greedy generate."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 9)]
    params = SamplingParams(max_new_tokens=12)
    cached = generate(model, prompts, params, vocab_size=tiny.vocab_size, use_cache=True)
    uncached = generate(model, prompts, params, vocab_size=tiny.vocab_size, use_cache=False)
    assert cached == uncached
    assert all(len(c) == 12 for c in cached)
    for prompt, got in zip(prompts, cached):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == got


def test_kv_cache_with_long_context_techniques_past_the_training_length(model, tiny):
    """NTK's base changes as the sequence grows past 64 tokens: megatron-core caches keys
    before RoPE, so the cached run still equals the recomputed one."""
    set_long_context([model], LongContext(True, True, "linear:16"))
    try:
        prompt = torch.randint(0, 1000, (60,), generator=torch.Generator().manual_seed(4)).tolist()
        params = SamplingParams(max_new_tokens=10)
        cached = generate(model, [prompt], params, vocab_size=tiny.vocab_size, use_cache=True)
        assert cached == generate(model, [prompt], params, vocab_size=tiny.vocab_size, use_cache=False)
    finally:
        set_long_context([model], LongContext())


def test_sampling_and_stop_tokens(model, tiny):
    prompt = [[1, 2, 3, 4]]
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9,
                            repetition_penalty=1.2, seed=7)
    a = generate(model, prompt, params, vocab_size=tiny.vocab_size)
    assert a == generate(model, prompt, params, vocab_size=tiny.vocab_size)  # seeded
    assert all(0 <= t < tiny.vocab_size for t in a[0])
    # the seed decides the sample: four seeds, four different continuations (a sampler that
    # ignored it would repeat one; one that used the global RNG would fail the line above)
    others = {tuple(generate(model, prompt, dataclasses.replace(params, seed=s), vocab_size=tiny.vocab_size)[0])
              for s in (8, 9, 10)}
    assert len(others | {tuple(a[0])}) == 4
    greedy = generate(model, prompt, SamplingParams(max_new_tokens=8), vocab_size=tiny.vocab_size)
    stop = greedy[0][3]
    first = greedy[0].index(stop)
    stopped = generate(model, prompt, SamplingParams(max_new_tokens=8), stop_ids=[stop],
                       vocab_size=tiny.vocab_size)
    assert stopped == [greedy[0][:first]]


# --------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def converted(tmp_path_factory, world):
    """A tiny random Qwen2ForCausalLM with the real vocabulary, saved by transformers and
    converted to torch_dist by our converter."""
    from megatron_qwen.checkpoint.convert import hf_to_mcore_checkpoint

    root = tmp_path_factory.mktemp("ppl")
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=88,
                      vocab_size=151851, seq_length=64, max_position_embeddings=64)
    hf_model = hf_reference(cfg, seed=5)
    hf_model.save_pretrained(root / "hf")
    hf_to_mcore_checkpoint(str(root / "hf"), str(root / "mcore"))
    return hf_model, root


def test_perplexity_equals_transformers_at_the_training_length(converted, tmp_path):
    """tools/eval_ppl.py on the converted checkpoint vs Qwen2ForCausalLM on the same windows
    of the same tokenized text (relative difference <= 1e-4)."""
    from megatron_qwen.inference import perplexity as ppl
    from megatron_qwen.tokenizer import load_tokenizer

    hf_model, root = converted
    out = tmp_path / "table.json"
    bad = tmp_path / "docs.jsonl"
    bad.write_text(DATA.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    table = ppl.main(["--load", str(root / "mcore"), "--data", str(bad), "--seq-lengths", "64",
                      "--num-samples", "3", "--packing", "concat", "--combinations", "plain",
                      "--output", str(out)])
    ours = table["plain RoPE"][64]
    tok = load_tokenizer()
    docs = ppl.load_documents(str(DATA), tok)
    samples = ppl.make_samples(docs, 64, 3, "concat", tok.eod_id)
    assert samples.shape == (3, 65)
    with torch.no_grad():
        logits = hf_model(samples[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), samples[:, 1:].reshape(-1))
    want = math.exp(nll.item())
    assert want > 1000  # a random model over 151k tokens: not a degenerate comparison
    assert abs(ours - want) / want <= 1e-4
    saved = json.loads(out.read_text())
    assert saved["perplexity"]["plain RoPE"]["64"] == pytest.approx(ours)


def test_perplexity_reports_skipped_lines_and_short_data(tmp_path, capsys):
    from megatron_qwen.inference import perplexity as ppl

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "hello world"}\n{"text": 3}\nnot json\n\xff\xfe\n')
    docs = ppl.load_documents(str(path))
    assert len(docs) == 1
    out = capsys.readouterr().out
    assert "skipped 3 unusable line(s)" in out and "d.jsonl:2" in out
    assert ppl.make_samples(docs, 64, 4, "documents", 0).shape == (0, 65)
    with pytest.raises(Exception, match="neither a JSONL file nor an indexed dataset"):
        ppl.load_documents(str(tmp_path / "missing"))
    assert [r.label for r in ppl.settings("table3", "uniform:8")] == [
        "plain RoPE", "+ dynamic_ntk", "+ dynamic_ntk + logn", "+ dynamic_ntk + logn + window_attn"]
    assert len(ppl.settings("all", "uniform:8")) == 8


def test_generate_tool_writes_jsonl(converted, tmp_path):
    """tools/generate.py's JSONL against transformers' greedy generate on the same prompt ids
    (a plain completion and a ChatML conversation with the default system turn): the same tokens
    up to the first stop token, decoded."""
    from megatron_qwen.inference import chat
    from megatron_qwen.tokenizer import load_tokenizer
    from megatron_qwen.tokenizer.chatml import render_chatml_prompt

    hf_model, root = converted
    messages = [{"role": "user", "content": "Hi"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The Python language"}) + "\n"
                       + json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "out.jsonl"
    results = chat.main(["--load", str(root / "mcore"), "--input", str(prompts), "--output", str(out),
                         "--max-new-tokens", "5", "--use-dynamic-ntk", "--window-rule", "uniform:32"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == results and [r.get("prompt") for r in lines] == ["The Python language", None]
    tok = load_tokenizer()
    ids = [tok.encode("The Python language"),
           render_chatml_prompt(messages, tok, system=chat.GenerateArgs.system)]
    stops = {tok.im_end_id, tok.eod_id}  # the batch holds a chat record: both stop it
    for line, prompt in zip(lines, ids):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
        assert line["response_tokens"] == cut and line["response"] == tok.decode(ref[:cut])
    assert lines[0]["response_tokens"] == 5  # a real completion, not an immediate stop
    prompts.write_text('{"prompt": "ok"}\n{"messages": "nope"}\n')
    with pytest.raises(SystemExit, match="prompts.jsonl:2"):
        chat.main(["--load", str(root / "mcore"), "--input", str(prompts)])


# --------------------------------------------------------------------------- ReAct


def test_react_prompt_parser_and_tool_loop():
    calls = []

    def weather(city: str) -> dict:
        calls.append(city)
        return {"city": city, "temp_c": 21}

    tools = [Tool("get_weather", "Current weather of a city.", weather,
                  [{"name": "city", "type": "string", "description": "city name", "required": True}],
                  human_name="Weather")]
    prompt = build_react_prompt("How warm is it in Hangzhou?", tools)
    assert "Action: the action to take, should be one of [get_weather]" in prompt
    assert prompt.endswith("Question: How warm is it in Hangzhou?")
    assert "get_weather: Call this tool to interact with the Weather API." in prompt

    turn = ('Thought: I should look up the weather.\nAction: get_weather\n'
            'Action Input: {"city": "Hangzhou"}\nObservation: invented by the model')
    step = parse_react(turn)
    assert (step.thought, step.action, step.action_input) == (
        "I should look up the weather.", "get_weather", '{"city": "Hangzhou"}')
    assert run_tool(step, tools) == '{"city": "Hangzhou", "temp_c": 21}'
    final = parse_react("Thought: I now know the final answer\nFinal Answer: 21 degrees.")
    assert final.is_final and final.final_answer == "21 degrees."
    with pytest.raises(ReActParseError, match="neither"):
        parse_react("I am not following the format")
    assert run_tool(parse_react("Action: nope\nAction Input: {}"), tools).startswith("Error: unknown tool")
    assert "not a JSON object" in run_tool(parse_react("Action: get_weather\nAction Input: {city"), tools)

    turns = iter([turn, "Thought: I now know the final answer\nFinal Answer: It is 21 C."])
    seen = []

    def model_turn(user_prompt, transcript):
        seen.append(transcript)
        return next(turns)

    result = react_loop("How warm is it in Hangzhou?", tools, model_turn)
    assert result.answer == "It is 21 C." and calls == ["Hangzhou", "Hangzhou"]
    assert 'Observation: {"city": "Hangzhou", "temp_c": 21}' in seen[1]
    assert "invented by the model" not in result.transcript


# --------------------------------------------------------------------------- parallel layouts


def test_tensor_and_pipeline_parallel_match_one_process(converted, tiny):
    """TP=2 and PP=2 (2 gloo processes) give the single-process perplexity, with and without
    the long-context techniques, and TP=2 greedy generation gives the same tokens."""
    from megatron_qwen.inference import perplexity as ppl
    from megatron_qwen.inference.loading import load_model
    from megatron_qwen.tokenizer import load_tokenizer
    from tests.dist import run_torchrun
    from tests.scripts import inference_parallel as worker

    _, root = converted
    out = run_torchrun(Path(worker.__file__), root / "mcore", DATA, nproc=2)
    results = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    tok = load_tokenizer()
    docs = ppl.load_documents(str(DATA), tok)
    samples = {n: ppl.make_samples(docs, n, 2, "concat", tok.eod_id) for n in (64, 128)}
    (single,), cfg = load_model(str(root / "mcore"))
    want = {"plain_64": ppl.perplexity([single], samples[64])}
    set_long_context([single], worker.ALL_ON)
    want["all_128"] = ppl.perplexity([single], samples[128])
    set_long_context([single], LongContext())
    assert want["all_128"] != pytest.approx(ppl.perplexity([single], samples[128]), rel=1e-3)
    greedy = generate(single, worker.PROMPTS, SamplingParams(max_new_tokens=6), vocab_size=cfg.vocab_size)
    for layout in ("tp2", "pp2"):
        for key, value in want.items():
            assert results[layout][key] == pytest.approx(value, rel=1e-4), (layout, key)
    assert results["tp2"]["greedy"] == greedy


# --------------------------------------------------------------------------- default numerics


def test_inference_numerics_defaults_per_device():
    """bf16 on a GPU (flash kept where it can run), fp32 + sdpa on CPU; an explicit backend its
    kernel refuses is a one-line error (the GPU cases run here: the function is pure)."""
    from megatron_qwen.config import ConfigError
    from megatron_qwen.inference.loading import inference_numerics, requested_dtype

    bf16, fp32 = torch.bfloat16, torch.float32
    assert inference_numerics("cuda", None, None, "flash", True, 128) == (bf16, "flash")
    assert inference_numerics("cuda", None, None, "flash", False, 128) == (bf16, "sdpa")
    assert inference_numerics("cuda", fp32, None, "flash", True, 128) == (fp32, "sdpa")
    assert inference_numerics("cpu", None, None, "flash", False, 128) == (fp32, "sdpa")
    assert inference_numerics("cpu", None, None, "unfused", False, 128) == (fp32, "unfused")
    assert inference_numerics("cuda", None, "flash", "sdpa", True, 128) == (bf16, "flash")
    with pytest.raises(ConfigError, match="attention_backend=flash takes bf16/fp16 only"):
        inference_numerics("cuda", fp32, "flash", "flash", True, 128)
    # flags: --dtype, and the older --bf16 / --no-bf16, unchanged
    assert requested_dtype(None, None) is None
    assert requested_dtype(True, None) == bf16 and requested_dtype(False, None) == fp32
    assert requested_dtype(None, "fp16") == torch.float16 and requested_dtype(True, "bf16") == bf16
    with pytest.raises(ConfigError, match="contradicts --dtype fp32"):
        requested_dtype(True, "fp32")
    with pytest.raises(ConfigError, match="--dtype 'half'"):
        requested_dtype(None, "half")


def test_generate_and_eval_ppl_run_a_flash_trained_checkpoint_with_default_flags(converted, tmp_path):
    """A checkpoint whose config says flash (every GPU recipe) runs on CPU with default flags
    (fp32 + sdpa), with the same tokens and perplexity as the sdpa checkpoint of the same weights."""
    import dataclasses

    from megatron_qwen.checkpoint.mapping import hf_to_mcore_state_dict
    from megatron_qwen.checkpoint.mcore_io import McoreCheckpointReader, save_mcore_checkpoint
    from megatron_qwen.inference import chat
    from megatron_qwen.inference import perplexity as ppl

    hf_model, root = converted
    cfg = dataclasses.replace(McoreCheckpointReader(root / "mcore").cfg, attention_backend="flash")
    flash = tmp_path / "flash"
    flash.mkdir()
    state = hf_to_mcore_state_dict(hf_model.state_dict(), cfg, "qwen2", cfg.padded_vocab_size)
    save_mcore_checkpoint(flash, state, cfg, ParallelConfig(), {"hf_vocab_size": 151851})
    assert McoreCheckpointReader(flash).cfg.attention_backend == "flash"
    args = ["--prompt", "The Python language", "--max-new-tokens", "4"]
    assert chat.main(["--load", str(flash), *args]) == chat.main(["--load", str(root / "mcore"), *args])
    args = ["--data", str(DATA), "--seq-lengths", "64", "--num-samples", "1", "--packing", "concat",
            "--combinations", "plain"]
    assert ppl.main(["--load", str(flash), *args]) == ppl.main(["--load", str(root / "mcore"), *args])
    with pytest.raises(SystemExit, match="attention_backend=flash"):  # asked for explicitly: refused
        chat.main(["--load", str(flash), "--attention-backend", "flash", *args[:0], "--prompt", "x"])


def test_tools_print_no_library_warnings_and_say_when_ntk_logn_cannot_act(converted):
    """tools/generate.py and tools/eval_ppl.py as a user runs them: no warning line from the
    libraries (Apex, cuda_graph_scope, torch.distributed.checkpoint deprecations: issue #15),
    and one line saying dynamic NTK / LogN change nothing within the training length (64)."""
    import os
    import subprocess
    import sys

    from megatron_qwen.inference.loading import inactive_notice
    from tests.dist import REPO

    _, root = converted
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(REPO)
    runs = {
        "generate": ["tools/generate.py", "--load", root / "mcore", "--prompt", "The Python language",
                     "--max-new-tokens", "3", "--use-dynamic-ntk", "--use-logn-attn"],
        "eval_ppl": ["tools/eval_ppl.py", "--load", root / "mcore", "--data", DATA, "--seq-lengths", "32",
                     "--num-samples", "1", "--packing", "concat"],
    }
    for name, argv in runs.items():
        proc = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert not [line for line in out.splitlines() if "Warning" in line or "warn(" in line], (name, out)
        assert "note: dynamic NTK and LogN change nothing here" in out and "(64 tokens)" in out, (name, out)
    assert inactive_notice(64, 65, True, True) is None and inactive_notice(64, 10, False, False) is None
    assert "act only past the training length (64 tokens)" in inactive_notice(64, None, False, True)
