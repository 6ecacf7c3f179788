"""The command line: summaries on stdout, bad input -> exit 2 with one line on stderr."""
import json
import os
import subprocess
import sys


def meganeura(*args):
    return subprocess.run([sys.executable, "-m", "meganeura.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_graph_from_config_alone(tmp_path):
    cfg = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = meganeura("graph", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "qwen3: 2 layers" in r.stdout and "attention×2" in r.stdout


def test_graph_dump_egraph_writes_what_the_optimizer_did(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "dump"
    r = meganeura("graph", str(tmp_path), "--dump-egraph", str(out))
    assert r.returncode == 0, r.stderr
    assert "kernels per step: 51 -> 17" in r.stdout and "qkv-pack" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["layer_kinds"] == 3 and report["rules_fired"]["gate-up-pack"] >= 3
    egraph = json.loads((out / "kind1.json").read_text())           # the decoder layer's e-graph
    assert {n["op"] for n in egraph["nodes"].values()} >= {"Lin", "Attn", "Pack3", "Pack2"}
    from meganeura.optimize.rules import RULES
    assert (out / "kind1.egg").read_text().count("(rule ") == len(RULES)
    assert (out / "kind1.dot").read_text().startswith("digraph")
    assert "fused_attention" in (out / "after.txt").read_text()
    assert "fused_attention" not in (out / "before.txt").read_text()


def test_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    for args in (["graph", str(tmp_path)], ["graph", str(tmp_path / "missing")]):
        r = meganeura(*args)
        assert r.returncode == 2
        lines = [line for line in r.stderr.splitlines() if not line.startswith("error: XDG")]
        assert len(lines) == 1 and lines[0].startswith("meganeura: error:"), r.stderr


def test_devices_lists_an_adapter():
    r = meganeura("devices")
    assert r.returncode == 0 and "backend=" in r.stdout and "max-storage-buffer-binding-size" in r.stdout


def test_opengl_adapters_come_last_of_their_type_and_a_run_on_one_says_so():
    """llvmpipe is offered through both Vulkan (lavapipe) and OpenGL; the OpenGL one has no subgroups. It is
    chosen only when nothing else of its type is there, and a run on it says so in one line on stderr."""
    from meganeura.backend.device import list_adapters

    adapters = list_adapters()
    for a, b in zip(adapters, adapters[1:]):
        assert not (a["type"] == b["type"] and a["backend"] == "OpenGL" and b["backend"] != "OpenGL"), adapters
    for a in adapters:
        if a["type"] == "CPU":      # a run of the built-in model on it, told apart by MEGANEURA_DEVICE
            r = subprocess.run([sys.executable, "-m", "meganeura.cli", "run", "--prompt", "a", "--max-new-tokens",
                                "2"], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "MEGANEURA_DEVICE": str(a["index"])})
            assert r.returncode == 0, r.stderr
            assert ("through OpenGL" in r.stderr) == (a["backend"] == "OpenGL"), (a, r.stderr)
