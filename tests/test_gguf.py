"""GGUF import: files written here as llama.cpp's converter writes them (gguf_util) give the logits of the
safetensors checkpoint they came from, quantized the same way (F16: as stored; Q8_0 / Q4_0: quantize="q8_0" /
"q4_0", GGUF's own blocks); other GGML types are widened exactly; the vocabulary works as a tokenizer; bad
files fail with one line."""
import json
import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

import meganeura as mn
import oracle
from gguf_util import write_gguf, write_vocab
from meganeura import quant
from meganeura.gguf_file import GGUFCheckpoint, config_from_gguf, tokenizer as gguf_tokenizer
from meganeura.hub import resolve
from meganeura.models import registry
from meganeura.tokenizer import Tokenizer, TokenizerError
from tokenizer_util import DEFAULT_TEXT, make_tokenizer_dir

MODES = {"F16": None, "Q8_0": "q8_0", "Q4_0": "q4_0"}
# llama.cpp converts Qwen3-MoE only when every layer is sparse
LOCAL = {"qwen3_moe_sparse": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                              dict(oracle.CASES["qwen3_moe"][2], mlp_only_layers=[]))}


def _hf_model(case: str):
    if case in oracle.CASES:
        return oracle.build(case)
    import torch
    import transformers

    model_cls, config_cls, kwargs = LOCAL[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).float().eval()
    oracle.randomise(model, 0)
    return model


@pytest.fixture(scope="module")
def f16_checkpoint(tmp_path_factory):
    """case -> a safetensors directory of the case's random model stored in f16 (GGUF vectors are F32, so
    both files then hold the same values)."""
    made = {}

    def make(case: str) -> str:
        if case not in made:
            path = tmp_path_factory.mktemp(f"{case}-f16")
            _hf_model(case).half().save_pretrained(path)
            made[case] = str(path)
        return made[case]

    return make


@pytest.fixture(scope="module")
def gguf_file(f16_checkpoint, tmp_path_factory):
    """(case, type) -> the .gguf of the case's f16 checkpoint, in a directory of its own."""
    made = {}

    def make(case: str, qtype: str) -> str:
        if (case, qtype) not in made:
            path = tmp_path_factory.mktemp(f"{case}-{qtype}") / f"{case}-{qtype}.gguf"
            write_gguf(path, f16_checkpoint(case), qtype)
            made[case, qtype] = str(path)
        return made[case, qtype]

    return make


IDS = np.random.default_rng(0).integers(0, 128, 13)


@pytest.mark.parametrize("case, qtype", [
    ("llama_basic", "F16"), ("llama_basic", "Q8_0"), ("llama_basic", "Q4_0"),
    ("llama32", "F16"),                    # LLaMA-3 RoPE scaling as rope_freqs
    ("llama_bias", "Q4_0"),                # permuted q/k biases, linear RoPE scaling
    ("qwen25", "Q8_0"), ("qwen3_yarn_bias", "Q4_0"), ("qwen3_moe_sparse", "Q8_0"),
    ("gemma4_text_all", "Q4_0"), ("gemma4_e2b_like", "F16"), ("gemma4_26b_like", "Q8_0"),
    ("gemma4_12b_like", "Q8_0"),
])
def test_gguf_logits_equal_the_safetensors_checkpoint_quantized_alike(f16_checkpoint, gguf_file, case, qtype):
    want = mn.load_model(f16_checkpoint(case), backend="numpy", quantize=MODES[qtype]).logits(IDS)
    got = mn.load_model(gguf_file(case, qtype), backend="numpy").logits(IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=oracle.tolerance(want, 1e-4))


@pytest.mark.parametrize("case, qtype, matrix", [
    ("llama32", "Q4_0", "model.layers.0.mlp.down_proj.weight"),
    ("qwen3_moe_sparse", "Q8_0", "model.layers.0.mlp.experts.gate_up_proj"),
    ("gemma4_text_all", "Q8_0", "model.layers.0.self_attn.o_proj.weight"),
])
def test_gguf_on_the_gpu_keeps_its_blocks_and_equals_the_reference(f16_checkpoint, gguf_file, case, qtype, matrix):
    model = mn.load_model(gguf_file(case, qtype))             # no quantize=: the file's blocks decide
    got = model.logits(IDS)
    assert model.program._runner.params[matrix].fmt == quant.GGUF_BLOCKS[qtype][0]
    ref = mn.load_model(gguf_file(case, qtype), backend="numpy").logits(IDS)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=oracle.tolerance(ref, 1e-4))
    safetensors = mn.load_model(f16_checkpoint(case), quantize=MODES[qtype])
    np.testing.assert_allclose(got, safetensors.logits(IDS), rtol=1e-4, atol=oracle.tolerance(ref, 1e-4))
    assert model.generate_ids(IDS, 6) == safetensors.generate_ids(IDS, 6)


@pytest.mark.parametrize("case", ["llama_bias", "qwen3_moe_sparse", "gemma4_26b_like"])
def test_tensors_read_back_under_hf_names_and_shapes(f16_checkpoint, gguf_file, case):
    st = mn.open_weights(f16_checkpoint(case))
    f16, q8 = GGUFCheckpoint(gguf_file(case, "F16")), GGUFCheckpoint(gguf_file(case, "Q8_0"))
    for ck in (f16, q8):
        assert {st.resolve(n) or n for n in ck.names()} == set(st.names())
        for name, t in ck.tensors.items():
            assert t.end - t.begin == ck.raw(name).nbytes
    for name in f16.names():
        np.testing.assert_array_equal(f16.f32(name), st.f32(st.resolve(name)), err_msg=name)
        t = q8.tensors[name]
        if t.dtype == "Q8_0":                 # blocks as stored, rows in HF order: our q8_0 of the same floats
            fmt = quant.FORMATS["q8_0"]
            planes = quant.from_blocks(q8.raw(name), "Q8_0", t.shape)
            want = fmt.quantize(st.f32(st.resolve(name)))
            assert np.array_equal(planes[0], want[0]) and np.array_equal(planes[1], want[1]), name
            np.testing.assert_array_equal(q8.f32(name), fmt.dequantize(*want, t.shape))


def test_other_ggml_types_are_widened_to_the_values_gguf_dequantizes(tmp_path):
    """Q4_K (rows of 256) and Q5_0 tensors read as float32: the model equals a safetensors checkpoint holding
    gguf's dequantized values."""
    import torch
    import transformers

    kwargs = dict(oracle.CASES["llama_basic"][2], intermediate_size=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).float().eval()
    oracle.randomise(model, 0)
    rng = np.random.default_rng(1)
    state = {k: v.half().float().numpy() for k, v in model.state_dict().items()}
    blocks = {}
    for layer in range(kwargs["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp."
        q4k = rng.integers(0, 256, (64, 144), dtype=np.uint8)            # one Q4_K block per row of 256
        q4k[:, 0:4] = np.array([0.004, 0.002], np.float16).view(np.uint8)   # its d and dmin scales
        state[p + "down_proj.weight"] = gguf.quants.dequantize(q4k, gguf.GGMLQuantizationType.Q4_K)
        q5 = gguf.quants.quantize(state[p + "up_proj.weight"], gguf.GGMLQuantizationType.Q5_0)
        state[p + "up_proj.weight"] = gguf.quants.dequantize(q5, gguf.GGMLQuantizationType.Q5_0)
        blocks[f"blk.{layer}.ffn_down.weight"] = (q4k, gguf.GGMLQuantizationType.Q4_K)
        blocks[f"blk.{layer}.ffn_up.weight"] = (q5, gguf.GGMLQuantizationType.Q5_0)
    model.save_pretrained(tmp_path / "st", state_dict={k: torch.from_numpy(v) for k, v in state.items()})
    write_gguf(tmp_path / "m.gguf", tmp_path / "st", "F16", blocks=blocks)
    ck = GGUFCheckpoint(tmp_path / "m.gguf")
    down = ck.tensors["model.layers.0.mlp.down_proj.weight"]
    assert down.dtype == "F32" and down.end - down.begin == 64 * 256 * 4
    want = mn.load_model(tmp_path / "st", backend="numpy").logits(IDS)
    np.testing.assert_allclose(mn.load_model(tmp_path / "m.gguf", backend="numpy").logits(IDS), want,
                               rtol=1e-5, atol=oracle.tolerance(want, 1e-5))


@pytest.mark.parametrize("case", ["llama32", "qwen3_yarn_bias", "qwen3_moe_sparse", "gemma4_text_all",
                                  "gemma4_e2b_like"])
def test_config_from_the_metadata_is_the_config_json(f16_checkpoint, gguf_file, case):
    _, want = registry.from_hf(f16_checkpoint(case))
    _, got = registry.from_hf(gguf_file(case, "F16"))
    # compared below (Gemma-4's geometry per layer: global_head_dim only serves configs without per_layer_config)
    differ = {"model_type", "rope_parameters", "eos_token_id", "bos_token_id", "global_head_dim", "per_layer_config"}
    assert {k: v for k, v in vars(got).items() if k not in differ} == \
        {k: v for k, v in vars(want).items() if k not in differ}
    assert got.eos_token_id == (None if want.eos_token_id is None else [want.eos_token_id])
    if case.startswith("gemma4"):
        assert got.model_type == "gemma4_text" and got.rope_parameters == want.rope_parameters
        assert [(got.layer_head_dim(i), got.layer_kv_heads(i)) for i in range(got.num_hidden_layers)] == \
            [(want.layer_head_dim(i), want.layer_kv_heads(i)) for i in range(want.num_hidden_layers)]
    elif case == "llama32":                  # LLaMA-3's scaling arrives as llama.cpp's divisors
        assert got.rope_parameters["freq_factors"][-1] == 32.0
    else:
        assert got.model_type == want.model_type and got.rope_parameters == want.rope_parameters


def test_a_gguf_file_or_its_only_directory_resolves_to_the_file(gguf_file, f16_checkpoint, tmp_path):
    path = gguf_file("llama_basic", "F16")
    assert resolve(path) == path and resolve(os.path.dirname(path)) == path
    mixed = tmp_path / "mixed"
    shutil.copytree(f16_checkpoint("llama_basic"), mixed)
    shutil.copy(path, mixed / "model.gguf")
    assert resolve(str(mixed)) == str(mixed)                 # safetensors beside it: the directory


# ---------------------------------------------------------------- the tokenizer

TEXTS = [DEFAULT_TEXT[:400], "Hello world", "  two spaces, a\ttab\n\nand new lines ",
         "émigré café naïve 日本語 🙂", "numbers 12345 and 3.14159, it's we'll THEY'VE",
         "<|eot_id|> specials <s> in </s> text", ""]
# the pre-tokenizer splits of LLaMA-3's and Qwen2's tokenizer.json
SPLITS = {"llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+",
          "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+"}


def _as_hf(tokenizer_json: str, pre: str) -> str:
    """The byte-level test tokenizer rewritten with LLaMA-3's or Qwen2's pre-tokenizer, as their files are."""
    spec = json.load(open(tokenizer_json))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": SPLITS[pre]}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec["model"]["ignore_merges"] = pre == "llama-bpe"
    spec["normalizer"] = {"type": "NFC"} if pre == "qwen2" else None
    out = tokenizer_json.replace(".json", f"-{pre}.json")
    json.dump(spec, open(out, "w"))
    return out


@pytest.mark.parametrize("kind, model, pre, merges", [
    ("bytelevel", "gpt2", "gpt-2", True), ("bytelevel", "gpt2", "llama-bpe", True),
    ("bytelevel", "gpt2", "qwen2", True),
    ("sentencepiece", "llama", None, True), ("sentencepiece", "llama", None, False),   # merges from scores
])
def test_the_gguf_vocabulary_tokenizes_as_its_tokenizer_json(tmp_path, kind, model, pre, merges):
    from tokenizers import Tokenizer

    make_tokenizer_dir(tmp_path / "tok", kind, vocab_size=400)
    source = str(tmp_path / "tok" / "tokenizer.json")
    if pre in SPLITS:
        source = _as_hf(source, pre)
    bos = "<|begin_of_text|>" if kind == "bytelevel" else "<s>"
    write_vocab(tmp_path / "v.gguf", source, model, bos=bos, eos="</s>" if model == "llama" else "<|eot_id|>",
                pre=pre, merges=merges)
    want, got = Tokenizer.from_file(source), gguf_tokenizer(tmp_path / "v.gguf")
    for text in TEXTS:
        ids = got.encode(text)
        assert ids == want.encode(text).ids, text
        assert got.decode(ids) == want.decode(ids)
    assert got.bos_id == want.token_to_id(bos)


def test_tokenizer_json_beside_the_file_wins_and_unknown_vocabularies_fail_in_one_line(gguf_file, tmp_path):
    path = gguf_file("llama_basic", "F16")          # its writer added no vocabulary
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json next to .*llama_basic-F16\.gguf"):
        gguf_tokenizer(path)
    folder = tmp_path / "with-tokenizer"
    make_tokenizer_dir(folder, "bytelevel", vocab_size=300)
    shutil.copy(path, folder / "m.gguf")
    beside = gguf_tokenizer(folder / "m.gguf")
    assert beside.name == str(folder)
    assert beside.encode("Hello there") == Tokenizer.from_dir(folder).encode("Hello there")


# ---------------------------------------------------------------- the command line

def _builtin_gguf(path, qtype: str = "BF16") -> str:
    """The built-in model as a .gguf with its vocabulary (byte-level BPE, GPT-2's pre-tokenizer)."""
    from meganeura.default_model import PATH

    write_gguf(path, PATH, qtype, vocab=dict(tokenizer_json=os.path.join(PATH, "tokenizer.json"), model="gpt2",
                                             pre="gpt-2", add_bos=True))
    return str(path)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "meganeura.cli", "run", *args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)


def test_run_a_gguf_file_streams_the_text_of_the_same_checkpoint(tmp_path):
    from meganeura.default_model import PATH

    path = _builtin_gguf(tmp_path / "builtin.gguf")
    got = _run(path, "--prompt", "Once upon a time", "--max-new-tokens", "12")
    want = _run(PATH, "--prompt", "Once upon a time", "--max-new-tokens", "12")
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout and got.stdout.strip()


def _bad_files(tmp_path) -> dict[str, str]:
    good = _builtin_gguf(tmp_path / "good.gguf", "Q8_0")
    data = open(good, "rb").read()
    files = {"truncated": data[:len(data) // 2], "not gguf": b"GGUF but not really" * 10, "empty": b""}
    out = {}
    for name, content in files.items():
        out[name] = str(tmp_path / f"{name.replace(' ', '_')}.gguf")
        open(out[name], "wb").write(content)
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")       # an architecture not supported
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out["unsupported architecture"] = str(tmp_path / "gpt2.gguf")
    return out


def test_bad_gguf_files_exit_2_with_one_line(tmp_path, capsys):
    from meganeura.cli import main

    for what, path in _bad_files(tmp_path).items():
        assert main(["run", path, "--prompt", "Hi", "--backend", "numpy"]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith("meganeura: error: ") and err.count("\n") == 1, (what, err)


def test_a_missing_tensor_and_an_unreadable_type_are_named(f16_checkpoint, tmp_path):
    from meganeura.weights import CheckpointError

    src = f16_checkpoint("llama_basic")
    drop = tmp_path / "drop"
    shutil.copytree(src, drop)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(drop / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(drop / "model.safetensors"))
    write_gguf(tmp_path / "drop.gguf", drop, "Q8_0")
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        mn.load_model(tmp_path / "drop.gguf", backend="numpy")
    ints = np.zeros((64, 64), np.int32)
    write_gguf(tmp_path / "ints.gguf", src, "F16",
               blocks={"blk.0.attn_q.weight": (ints, gguf.GGMLQuantizationType.I32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.weight has GGML type I32"):
        mn.load_model(tmp_path / "ints.gguf", backend="numpy")
