"""`meganeura run` end to end in a subprocess: streamed text equal to the oracles, stats, chat, seeds,
repo ids from the HF cache, e-graph dumps, and bad input -> exit 2 with one line on stderr."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import oracle
from tokenizer_util import make_tokenizer_dir

VOCAB = 320                       # the byte-level test tokenizer needs at least 261 ids
PROMPT = "The quick brown fox"
N = 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path_factory.mktemp("hf-cache")),
             PYTHONIOENCODING="utf-8")
    e.pop("HF_HOME", None)
    return e


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (llama_basic with a bigger vocabulary) and a tiny trained tokenizer."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny-llama")
    tok_dir = make_tokenizer_dir(path, "bytelevel", vocab_size=VOCAB)
    tok = json.loads((path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    kwargs = dict(oracle.CASES["llama_basic"][2], vocab_size=VOCAB, bos_token_id=ids["<|begin_of_text|>"],
                  eos_token_id=ids["<|eot_id|>"], max_position_embeddings=256)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).float().eval()
    oracle.randomise(hf, 0)
    hf.save_pretrained(path)
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    return tok_dir, hf


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same checkpoint loaded in this process on the reference backend."""
    import meganeura as mn

    return mn.load_model(model_dir[0], backend="numpy")


def run(env, *args, **kw):
    r = subprocess.run([sys.executable, "-m", "meganeura.cli", "run", *args], capture_output=True, env=env,
                       timeout=300, **kw)
    r.stdout, r.stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    return r


def stderr_lines(r):
    return [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("error: XDG")]


def test_streams_the_greedy_continuation_of_transformers_with_stats(env, model_dir, reference):
    import torch

    path, hf = model_dir
    ids = reference.encode_prompt(PROMPT)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    eos = set(reference.eos_ids) | set(reference.tokenizer.eos_ids)
    stop = next((i for i, t in enumerate(out) if t in eos), len(out))       # EOS ends the text unprinted
    expected = reference.tokenizer.decode(out[:stop])
    assert expected.strip()
    r = run(env, path, "--prompt", PROMPT, "--max-new-tokens", str(N), "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    stats = "\n".join(stderr_lines(r))
    for label in ("load: ", "compile: ", "time to first token: ", "prefill: ", "decode: "):
        assert any(line.startswith(label) and any(c.isdigit() for c in line) for line in stats.splitlines()), stats
    assert f"tokens: {len(ids)} prompt, {min(stop + 1, len(out))} new" in stats


def test_chat_applies_the_template(env, model_dir, reference):
    expected = "".join(reference.generate("Hello there", max_new_tokens=N, chat=True))
    r = run(env, model_dir[0], "--prompt", "Hello there", "--chat", "--max-new-tokens", str(N), "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_quantized_run_streams_what_the_reference_computes_with_the_same_weights(env, model_dir, mode):
    import meganeura as mn

    expected = "".join(mn.load_model(model_dir[0], backend="numpy", quantize=mode).generate(PROMPT, max_new_tokens=N))
    r = run(env, model_dir[0], "--prompt", PROMPT, "--max-new-tokens", str(N), "--quantize", mode)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_seeded_sampling_repeats(env, model_dir, reference):
    args = (model_dir[0], "--prompt", PROMPT, "--max-new-tokens", str(N), "--temperature", "0.9", "--top-k", "40",
            "--top-p", "0.95", "--seed", "7", "--backend", "numpy")
    a, b = run(env, *args), run(env, *args)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    expected = "".join(reference.generate(PROMPT, max_new_tokens=N, temperature=0.9, top_k=40, top_p=0.95, seed=7))
    assert a.stdout == expected + "\n"


def test_repo_id_from_the_hf_cache_offline(env, model_dir, reference):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(env["HF_HUB_CACHE"], "models--tiny-org--tiny-llama")
    shutil.copytree(model_dir[0], os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    r = run(env, "tiny-org/tiny-llama", "--prompt", PROMPT, "--max-new-tokens", "4", "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(reference.generate(PROMPT, max_new_tokens=4)) + "\n"


def test_dump_egraph_writes_the_generating_program(env, model_dir, tmp_path):
    out = tmp_path / "dump"
    r = run(env, model_dir[0], "--prompt", PROMPT, "--max-new-tokens", "2", "--backend", "numpy",
            "--dump-egraph", str(out))
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stderr and r.stdout.strip()
    assert "kernels per step" in (out / "report.txt").read_text()
    assert "cache_write" in (out / "after.txt").read_text()        # the cached program, not the full forward
    assert (out / "kind1.egg").exists() and (out / "kind1.dot").read_text().startswith("digraph")


def test_ctrl_c_stops_generation_with_130(env, model_dir):
    p = subprocess.Popen([sys.executable, "-m", "meganeura.cli", "run", model_dir[0], "--prompt", PROMPT,
                          "--max-new-tokens", "200", "--backend", "numpy"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        first = p.stdout.read(1)                       # the first piece is out: generation is under way
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=120)
    finally:
        p.kill()
    if p.returncode == 0:
        pytest.skip("generation ended before the interrupt arrived")
    assert first and p.returncode == 130, err.decode()
    assert rest.endswith(b"\n") and b"Traceback" not in err


def corrupt(src, dst, what):
    shutil.copytree(src, dst)
    cfg = os.path.join(dst, "config.json")
    if what == "config":
        with open(cfg, "w") as f:
            f.write("{not json")
    elif what == "weights":
        weights = os.path.join(dst, "model.safetensors")
        os.truncate(weights, os.path.getsize(weights) // 2)
    elif what == "arch":
        with open(cfg) as f:
            c = json.load(f)
        c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        with open(cfg, "w") as f:
            json.dump(c, f)
    return str(dst)


@pytest.mark.parametrize("case", ["missing dir", "unknown repo", "broken config", "corrupt safetensors",
                                  "gpt2", "empty prompt", "prompt over the context", "temperature -1",
                                  "top-p 0", "top-p 1.5", "top-k 0", "dump without optimizer", "quantize q3"])
def test_bad_input_exits_2_with_one_line(case, env, model_dir, tmp_path):
    good = model_dir[0]
    model, extra, prompt = good, [], PROMPT
    if case == "missing dir":
        model = str(tmp_path / "missing")
    elif case == "unknown repo":
        model = "nobody-here/no-such-model"
    elif case in ("broken config", "corrupt safetensors", "gpt2"):
        model = corrupt(good, tmp_path / "m", {"broken config": "config", "corrupt safetensors": "weights",
                                                "gpt2": "arch"}[case])
    elif case == "empty prompt":
        prompt = "  \n "
    elif case == "prompt over the context":
        prompt, extra = " ".join(["the quick brown fox jumps over the lazy dog"] * 3), ["--context", "8"]
    elif case == "dump without optimizer":
        extra = ["--no-optimize", "--dump-egraph", str(tmp_path / "d")]
    else:
        flag, value = case.split(" ")
        extra = [f"--{flag}", value]
    r = run(env, model, "--prompt", prompt, "--max-new-tokens", "4", "--backend", "numpy", *extra)
    lines = stderr_lines(r)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("meganeura: error: "), r.stderr
    if case == "prompt over the context":
        assert "tokens; the context holds 8" in lines[0]


def test_default_model_writes_text(env):
    try:
        from meganeura.default_model import PATH
    except ImportError as e:
        pytest.skip(f"meganeura.default_model is not importable: {e}")
    if not os.path.isfile(os.path.join(PATH, "config.json")):
        pytest.skip(f"the default model's files are not in {PATH} yet")
    r = run(env, "--prompt", "It is a truth universally acknowledged", "--max-new-tokens", str(N))
    assert r.returncode == 0, r.stderr
    assert sum(c.isalpha() for c in r.stdout) >= 5, r.stdout
