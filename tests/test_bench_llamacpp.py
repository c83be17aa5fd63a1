"""The llama.cpp peer of ``bench/e2e.py`` without building llama.cpp: its command lines, the
parsing of output captured from the real tools (llama-cpp-python 0.3.36's vendored llama.cpp,
SmolLM2-135M-Instruct Q4_1), a whole run through stand-in tools, and the greedy comparison and
tables that put it beside ours."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import each other as modules

import e2e  # noqa: E402
import llamacpp as lc  # noqa: E402
import readme_tables  # noqa: E402

PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
          "Face<|im_end|>\n<|im_start|>user\nWrite a Python function that checks whether a "
          "number is prime. Use '\\n' and \\\\ here.<|im_end|>\n<|im_start|>assistant\n")
NEW_TEXT = ("```python\ndef is_prime(n):\n    if n < 2:\n        return False\n    for i in "
            "range(2, int(n**")

# llama-completion -n 32 --temp 0 -t 2 on PROMPT (a busy machine: the slow figures are real)
COMPLETION_STDOUT = NEW_TEXT + "\n\n"
COMPLETION_STDERR = """\
0.00.247.465 I sampler seed: 0
0.00.247.478 I generate: n_ctx = 2048, n_batch = 2048, n_predict = 32, n_keep = 0
0.06.585.746 I common_perf_print:    sampling time =       5.09 ms
0.06.585.763 I common_perf_print:    samplers time =       3.81 ms /    82 tokens
0.06.585.777 I common_perf_print:        load time =     157.26 ms
0.06.585.789 I common_perf_print: prompt eval time =    2149.80 ms /    50 tokens (   43.00 ms \
per token,    23.26 tokens per second)
0.06.585.801 I common_perf_print:        eval time =    4110.68 ms /    31 runs   (  132.60 ms \
per token,     7.54 tokens per second)
0.06.585.813 I common_perf_print:       total time =    6338.70 ms /    81 tokens
0.06.585.824 I common_perf_print: unaccounted time =      73.13 ms /   1.2 %      (total - \
sampling - prompt eval - eval) / (total)
0.06.585.835 I common_perf_print:    graphs reused =         30
"""

# llama-lookup -n 32 --temp 0 -t 1 --spec-draft-n-max 3 on PROMPT: no n-gram drafted
LOOKUP_STDOUT = "\n\n" + PROMPT + NEW_TEXT + "0" + "\n\n\n\n"
LOOKUP_STDERR = """\
0.00.433.830 I cmn          init: llama threadpool init, n_threads = 1
0.01.087.203 I encoded   50 tokens in    0.341 seconds, speed:  243.574 t/s
0.01.087.204 I decoded   33 tokens in    0.294 seconds, speed:  112.099 t/s
0.01.087.204 I
0.01.087.204 I n_draft      = 3
0.01.087.204 I n_predict    = 33
0.01.087.205 I n_drafted    = 0
0.01.087.205 I t_draft_flat = 0.03 ms
0.01.087.206 I t_draft      = 0.25 ms, inf us per token, 0.00 tokens per second
0.01.087.206 I n_accept     = 0
0.01.087.206 I accept       = -nan%
0.01.087.206 I
target:

0.01.087.209 I common_perf_print:        load time =     169.60 ms
0.01.087.209 I common_perf_print: prompt eval time =     340.75 ms /    50 tokens (    6.82 ms \
per token,   146.73 tokens per second)
0.01.087.210 I common_perf_print:        eval time =     290.69 ms /    32 runs   (    9.08 ms \
per token,   110.08 tokens per second)
"""

# llama-lookup -n 24 on a repetitive prompt: three tokens drafted, none accepted
LOOKUP_DRAFTED_STDERR = """\
0.00.426.653 I encoded   23 tokens in    0.094 seconds, speed:  508.695 t/s
0.00.426.670 I decoded   25 tokens in    0.169 seconds, speed:  148.218 t/s
0.00.426.692 I n_draft      = 3
0.00.426.703 I n_predict    = 25
0.00.426.713 I n_drafted    = 3
0.00.426.747 I n_accept     = 0
0.00.426.758 I accept       = 0.000%
"""


def test_completion_figures_are_the_counters_not_the_printed_rates():
    r = lc.parse_completion(COMPLETION_STDOUT, COMPLETION_STDERR)
    assert r["text"] == NEW_TEXT
    assert (r["prompt_tokens"], r["tokens"]) == (50, 32)  # 31 one-token runs after the prefill
    assert r["seconds"] == pytest.approx(6.3387)
    assert r["prefill_s"] == pytest.approx(2.1498)
    assert r["prefill_tokens_per_s"] == pytest.approx(50 / 2.1498)
    assert r["decode_tokens_per_s"] == pytest.approx(31 / 4.11068)


def test_lookup_rates_are_recomputed_from_its_counts():
    r = lc.parse_lookup(LOOKUP_STDOUT, LOOKUP_STDERR, PROMPT)
    assert r["text"] == NEW_TEXT + "0"  # one token past the budget of 32
    assert (r["prompt_tokens"], r["tokens"]) == (50, 33)
    # it prints 243.574 t/s: the final length over the encode time, not the prompt's
    assert r["prefill_tokens_per_s"] == pytest.approx(50 / 0.341)
    assert r["decode_tokens_per_s"] == pytest.approx(33 / 0.294)
    assert r["seconds"] == pytest.approx(0.341 + 0.294)
    assert (r["n_drafted"], r["n_accept"]) == (0, 0) and "acceptance" not in r
    drafted = lc.parse_lookup("\n\nP" + "x\n\n\n\n", LOOKUP_DRAFTED_STDERR, "P")
    assert (drafted["n_drafted"], drafted["acceptance"], drafted["text"]) == (3, 0.0, "x")


def test_parsers_refuse_output_they_do_not_recognise():
    with pytest.raises(ValueError, match="prompt eval"):
        lc.parse_completion(COMPLETION_STDOUT, "llama_perf: nothing here\n")
    with pytest.raises(ValueError, match="stdout"):
        lc.parse_lookup(LOOKUP_STDOUT, LOOKUP_STDERR, PROMPT.replace("prime", "even"))
    with pytest.raises(ValueError, match="stdout"):
        lc.parse_completion(NEW_TEXT, COMPLETION_STDERR)  # no closing blank line: cut short
    assert lc.parse_ids("[1, 9690, 198]\n") == [1, 9690, 198]
    assert lc.parse_ids("load: noise\n[]\n") == []
    with pytest.raises(ValueError):
        lc.parse_ids("error: no model\n")


def test_command_lines():
    b, g = Path("/opt/lc/bin"), Path("/m/model.gguf")
    cmd = lc.completion_command(b, g, PROMPT, 96, seed=3)
    assert cmd == ["/opt/lc/bin/llama-completion", "-m", "/m/model.gguf", "-p", PROMPT,
                   "--no-escape", "-n", "96", "--ignore-eos", "-t", "2", "-tb", "2",
                   "-c", "2048", "-s", "3", "--temp", "0", *lc.REPACK_ARGS, "-no-cnv",
                   "--no-display-prompt", "--simple-io"]
    sampled = lc.lookup_command(b, g, PROMPT, 32, temperature=0.7, threads=1, ctx=4096,
                                draft_max=5)
    assert sampled == ["/opt/lc/bin/llama-lookup", "-m", "/m/model.gguf", "-p", PROMPT,
                       "--no-escape", "-n", "32", "--ignore-eos", "-t", "1", "-tb", "1",
                       "-c", "4096", "-s", "0", "--temp", "0.7", "--top-k", "0", "--top-p",
                       "1", "--min-p", "0", *lc.REPACK_ARGS, "--spec-draft-n-max", "5"]
    # no seed (e2e.py --unseeded): llama.cpp's own random seed
    unseeded = lc.completion_command(b, g, PROMPT, 8, temperature=0.7, seed=None)
    assert unseeded[unseeded.index("-s") + 1] == "-1"
    # repacking is off exactly where the CPU has AMX (ggml's AMX matmul crashed there)
    amx = "flags\t\t: fpu avx512f avx512_vnni amx_tile amx_int8\n"
    assert lc.has_amx(amx) and not lc.has_amx(amx.replace(" amx_int8", ""))
    assert not lc.has_amx("bugs\t\t: amx_int8\n")  # only the flags line counts
    assert lc.tokenize_command(b, g, PROMPT) == [
        "/opt/lc/bin/llama-tokenize", "-m", "/m/model.gguf", "-p", PROMPT, "--no-escape",
        "--ids", "--log-disable"]


class _Tok:
    """Token i decodes to PIECES[i]; token 7 is the first byte of a two-byte character."""

    PIECES = {0: "def", 1: " f", 2: "():", 3: "\n", 4: "<eos>", 5: " g", 7: "\ufffd", 8: "é"}

    def decode(self, ids, **_):
        text = "".join(self.PIECES[i] for i in ids)
        return text.replace("\ufffdé", "é")  # 7 then 8: the character whole


def test_agreement_counts_our_tokens_up_to_our_first_eos():
    dec = _Tok().decode
    assert lc.agreement([0, 1, 2, 3], {4}, "def f():\n  pass", dec) == (4, 4)
    assert lc.agreement([0, 1, 2, 3], {4}, "def g():\n", dec) == (1, 4)
    # past our EOS the tool (EOS masked) decodes something else: not compared
    assert lc.agreement([0, 1, 4, 5], {4}, "def f something", dec) == (2, 2)
    assert lc.agreement([4, 0], {4}, "x", dec) == (0, 0)
    # a character split over two tokens is judged once whole
    assert lc.agreement([0, 7, 8, 1], set(), "defé f", dec) == (4, 4)
    assert lc.agreement([0, 7, 8], set(), "defè", dec) == (1, 3)


def _fake_tools(folder: Path, completion_exit: int = 0) -> Path:
    """Stand-ins for the three tools: they print the captured output."""
    folder.mkdir()
    (folder / "out").write_text(COMPLETION_STDOUT)
    (folder / "err").write_text(COMPLETION_STDERR)
    (folder / "lk_out").write_text(LOOKUP_STDOUT)
    (folder / "lk_err").write_text(LOOKUP_STDERR)
    scripts = {
        "llama-completion": f'sleep 0.2; cat "{folder}/out"; cat "{folder}/err" >&2; '
                            f'echo "$@" > "{folder}/args"; exit {completion_exit}',
        "llama-lookup": f'cat "{folder}/lk_out"; cat "{folder}/lk_err" >&2',
        "llama-tokenize": 'echo "[5, 6, 7]"',
    }
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def test_a_run_through_stand_in_tools(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 2**20)
    tok = SimpleNamespace(decode=lambda ids, **kw: PROMPT)
    bins = _fake_tools(tmp_path / "bin")
    ar = lc.LlamaCppSystem("llamacpp_ar", bins, gguf, tok, threads=lambda: 1)
    r = ar.run([5, 6, 7], 32, 0.0, seed=4)
    assert r["text"] == NEW_TEXT and r["tokens"] == 32 and r["threads"] == 1
    assert r["tokens_per_s"] == pytest.approx(32 / 6.3387)
    assert r["prompt_tokens_match"] is True and r["peak_rss_mb"] > 0
    assert ar.memory_mb == 1.0
    args = (bins / "args").read_text()
    assert "-s 4 " in args and "-t 1 -tb 1" in args and "--temp 0" in args
    other = ar.run([5, 6], 32, 0.0, seed=0)  # the tool's prompt ids differ from ours
    assert other["prompt_tokens_match"] is False
    look = lc.LlamaCppSystem("llamacpp_lookup", bins, gguf, tok).run([5, 6, 7], 32, 0.0, 0)
    assert look["text"] == NEW_TEXT + "0" and look["tokens"] == 33
    with pytest.raises(ValueError):
        lc.LlamaCppSystem("llamacpp_server", bins, gguf, tok)


def test_a_failing_tool_raises_with_its_last_lines(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    bins = _fake_tools(tmp_path / "bin", completion_exit=3)
    ar = lc.LlamaCppSystem("llamacpp_ar", bins, gguf, SimpleNamespace(decode=lambda i, **k: "p"))
    with pytest.raises(RuntimeError, match="llama-completion exited 3: .*graphs reused"):
        ar.run([1], 8, 0.0, 0)


def test_no_build_means_no_binaries(tmp_path):
    assert lc.find_binaries(tmp_path) is None


def test_build_script_says_what_is_missing(tmp_path):
    """Without cmake on PATH the script stops with one line naming it (no download)."""
    bins = tmp_path / "bin"
    bins.mkdir()
    for tool in ("bash", "dirname", "grep", "sha1sum", "cut", "cat"):
        path = shutil.which(tool)
        if path is None:
            pytest.skip(f"{tool} not found")
        (bins / tool).symlink_to(path)
    proc = subprocess.run(["bash", str(lc.BUILD_SCRIPT), "--cache", str(tmp_path / "c")],
                          env={"PATH": str(bins), "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "build_llamacpp.sh: cmake not found (apt-get install -y cmake, or pip install cmake)"]
    assert not (tmp_path / "c").exists()


def test_greedy_check_and_rates_table():
    pipe = SimpleNamespace(eos_token_ids={4}, tokenizer=_Tok())
    results = {
        "ours_ar": {"ids": [0, 1, 2, 3]},
        "ours_sync": {"ids": [0, 1, 2, 3]},
        "llamacpp_ar": {"text": "def f():\n"},
        "llamacpp_lookup": {"text": "def f():\n  x"},
    }
    e2e.check_greedy(results, pipe)
    assert [r["identical_to_first"] for r in results.values()] == [True, True, True, True]
    assert (results["llamacpp_ar"]["agreed_tokens"],
            results["llamacpp_ar"]["compared_tokens"]) == (4, 4)
    results["llamacpp_ar"]["text"] = "def g"
    e2e.check_greedy(results, pipe)
    assert results["llamacpp_lookup"]["identical_to_first"] is False
    assert results["llamacpp_ar"]["agreed_tokens"] == 1

    def run(agreed, prefill, rss, drafted=4, accepted=1):
        return {"tokens_per_s": 100.0, "prompt_tokens": 50, "prefill_tokens_per_s": prefill,
                "decode_tokens_per_s": 150.0, "agreed_tokens": agreed, "compared_tokens": 4,
                "prompt_tokens_match": True, "peak_rss_mb": rss, "threads": 2,
                "n_drafted": drafted, "n_accept": accepted, "identical_to_first": True}

    summary = e2e.summarize({"llamacpp_lookup": [run(4, 400.0, 170.0),
                                                 run(2, 500.0, 180.0, 6, 3)]})
    d = summary["llamacpp_lookup"]
    assert d["acceptance"] == [0.4] and d["agreement_with_ours"] == 0.75
    assert d["prompts_equal_to_ours"] == 1 and d["peak_rss_mb"] == 180.0
    assert d["median_prefill_tokens_per_s"] == 450.0
    rows = readme_tables.rates_table([{"meta": {"task": "humaneval", "temperature": 0.0},
                                       "summary": summary}])
    assert rows[2] == ("| humaneval | 0 | llamacpp_lookup (2 threads) | 50 | 450 | 150.0 | "
                       "100.0 | 1/2 (75%) | 180 |")


def test_llamacpp_systems_are_skipped_with_the_reason_printed(tmp_path, configure, capsys):
    configure(cache_dir=tmp_path)  # a cache with no llama.cpp build in it
    pipe = SimpleNamespace(stages=[SimpleNamespace(model_dir=str(tmp_path))],
                           tokenizer=_Tok())
    args = e2e._parser().parse_args(["--systems", "llamacpp_ar,llamacpp_lookup"])
    systems, skipped = e2e.make_systems(args, pipe)
    why = "llama.cpp is not built for this CPU (run ./scripts/build_llamacpp.sh)"
    assert systems == {} and skipped == {"llamacpp_ar": why, "llamacpp_lookup": why}
    assert capsys.readouterr().err.splitlines() == [f"llamacpp_ar: {why}, skipped",
                                                    f"llamacpp_lookup: {why}, skipped"]
    bins = _fake_tools(tmp_path / "bin")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    args = e2e._parser().parse_args(["--systems", "llamacpp_lookup", "--llamacpp-bin",
                                     str(bins), "--gguf", str(gguf), "--llamacpp-draft", "5",
                                     "--llamacpp-threads", "1"])
    systems, skipped = e2e.make_systems(args, pipe)
    look = systems["llamacpp_lookup"]
    assert (look.kind, look.bin_dir, look.threads, look.draft_max) == (
        "llamacpp_lookup", bins, 1, 5) and skipped == {}
    args = e2e._parser().parse_args(["--systems", "llamacpp_ar", "--models", "a", "b",
                                     "--llamacpp-bin", str(bins)])
    assert "--gguf" in e2e.make_systems(args, pipe)[1]["llamacpp_ar"]
